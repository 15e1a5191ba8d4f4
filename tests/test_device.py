"""compute.device: which device a choice resolves to, and that the device code path (torch)
gives the numpy path's bytes.

The device path runs on torch's CPU device by default, as a CUDA GPU would run it; on a
machine with a GPU, ``EMBEDDING_DISSECT_TEST_DEVICE=cuda pytest tests/test_device.py`` runs
the same checks on the GPU itself."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest

from pipeline.core import knn
from pipeline.core.device import (
    DEVICE_ENV,
    Resident,
    compute_device,
    computing_on,
    cpu_product,
    resolve_device,
    use_compute_settings,
)
from pipeline.core.errors import DissectError
from pipeline.core.knn import TopK, excluding_own, knn_graph, nearest_keys, unit_rows
from pipeline.core.pca import fit_pca

# The torch device the device-path tests run on: "cpu" (torch's CPU code) unless set.
DEVICE_UNDER_TEST = os.environ.get("EMBEDDING_DISSECT_TEST_DEVICE", "cpu")


def never() -> bool:
    raise AssertionError("torch was asked about CUDA although no NVIDIA driver is installed")


@pytest.mark.parametrize(
    "choice, driver, cuda, expected",
    [
        ("cpu", True, True, None),
        ("auto", True, True, "cuda"),
        ("auto", True, False, None),
        ("cuda", True, True, "cuda"),
        ("torch-cpu", False, False, "cpu"),
    ],
)
def test_each_choice_resolves_to_its_device(choice, driver, cuda, expected):
    assert resolve_device(choice, lambda: driver, lambda: cuda) == expected


def test_auto_without_a_driver_is_the_cpu_without_importing_torch():
    assert resolve_device("auto", lambda: False, never) is None


def test_cuda_without_a_device_is_refused_with_the_fix():
    with pytest.raises(DissectError, match="^compute.device is cuda but torch sees no CUDA device.*set compute.device to auto or cpu$"):
        resolve_device("cuda", lambda: True, lambda: False)


def test_the_default_on_a_machine_without_a_gpu_computes_with_numpy(monkeypatch):
    # auto is the default; a machine with no NVIDIA driver (CI's) keeps numpy's BLAS.
    from pipeline.core.device import DEVICE_ENV, nvidia_driver_present

    if nvidia_driver_present():
        pytest.skip("this machine has an NVIDIA driver: auto may pick its GPU")
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    with computing_on("cuda"):
        use_compute_settings({})
        assert compute_device() is None


def test_the_setting_is_checked_and_the_environment_overrides_it(monkeypatch):
    with pytest.raises(DissectError, match="^compute.device must be one of auto, cpu, cuda, got \"gpu\"$"):
        use_compute_settings({"compute": {"device": "gpu"}})
    with computing_on(None):
        monkeypatch.setenv(DEVICE_ENV, "torch-cpu")
        use_compute_settings({"compute": {"device": "cpu"}})
        assert compute_device() == "cpu"
        monkeypatch.setenv(DEVICE_ENV, "tpu")
        with pytest.raises(DissectError, match=f"^{DEVICE_ENV} must be one of .*got 'tpu'; unset it"):
            use_compute_settings({})
    assert compute_device() is None


def test_computing_on_restores_the_device_before_it():
    with computing_on("cpu"):
        assert compute_device() == "cpu"
        with computing_on(None):
            assert compute_device() is None
        assert compute_device() == "cpu"
    assert compute_device() is None


def test_resident_products_by_hand():
    # Rows e1, e2, e1 + e2 of a 3x2 matrix: their products are small integers, exact in float32.
    matrix = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)  # [3, 2]
    keys = np.array([[2, 3]], dtype=np.float32)  # [1, 2]
    for device in (None, DEVICE_UNDER_TEST):
        with computing_on(device):
            resident = Resident(matrix)
            assert (resident.on_device is None) == (device is None)
            assert resident.times_rows(slice(0, 3), slice(2, 3)).tolist() == [[1], [1], [2]]
            assert resident.times(keys).tolist() == [[2], [3], [5]]


def test_hits_between_by_hand():
    # Rows 0-1 (e1, e2) times rows 2-3 (e1 + e2, -e1): the product [[1, -1], [1, 0]], exact.
    matrix = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32)  # [4, 2]
    row_floor = np.array([1, 2], dtype=np.float32)  # row 0 keeps its 1; row 1 has nothing at 2
    column_floor = np.array([1, -1], dtype=np.float32)  # column 0 keeps both 1s; column 1 all
    with computing_on(DEVICE_UNDER_TEST):
        (r, c, value), (column_r, column_c, column_value) = Resident(matrix).hits_between(slice(0, 2), slice(2, 4), row_floor, column_floor)
    assert (r.tolist(), c.tolist(), value.tolist()) == ([0], [0], [1.0])
    assert (column_r.tolist(), column_c.tolist(), column_value.tolist()) == ([0, 0, 1, 1], [0, 1, 0, 1], [1.0, -1.0, 1.0, 0.0])
    assert r.dtype == column_c.dtype == np.int64 and value.dtype == np.float32


def test_cpu_product_by_hand_along_either_side():
    # Rows e1, e2, e1 + e2 against (2, 3): the longer side is split, whichever it is.
    matrix = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)  # [3, 2]
    keys = np.array([[2, 3]], dtype=np.float32)  # [1, 2]
    assert cpu_product(matrix, keys).tolist() == [[2], [3], [5]]
    assert cpu_product(keys, matrix).tolist() == [[2, 3, 5]]


@pytest.mark.parametrize("shape", [(600, 5), (5, 600), (700, 650)])
def test_cpu_product_spans_equal_one_product(shape):
    # Small integers: every product is exact in float32, so the spans must give the same numbers.
    rng = np.random.default_rng(1)
    left = rng.integers(-3, 4, size=(shape[0], 16)).astype(np.float32)
    right = rng.integers(-3, 4, size=(shape[1], 16)).astype(np.float32)
    expected = left.astype(np.int64) @ right.T.astype(np.int64)
    assert np.array_equal(cpu_product(left, right), expected)


def test_cpu_product_writes_into_the_scratch_buffer_when_it_fits():
    left = np.arange(8, dtype=np.float32).reshape(4, 2)  # [4, 2]
    scratch = np.full(20, np.nan, dtype=np.float32)
    out = cpu_product(left, left[:3], scratch)
    assert out.shape == (4, 3) and np.shares_memory(out, scratch) and out.flags.c_contiguous
    assert np.array_equal(out, left @ left[:3].T)
    small = np.empty(11, dtype=np.float32)
    assert not np.shares_memory(cpu_product(left, left[:3], small), small)


def test_cpu_product_in_another_thread_is_right_and_leaves_the_count_as_it_was():
    # The main thread controls OpenBLAS's count (threadpoolctl): a product in a worker thread
    # runs without the limit, with the same numbers, and changes nothing for the main thread.
    import threading

    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    left = np.arange(1200, dtype=np.float32).reshape(600, 2) % 7  # [600, 2]
    right = np.array([[1, 2], [3, 4]], dtype=np.float32)  # [2, 2]
    cpu_product(left, right)  # the main thread sets a limit first
    before = blas_threads()
    got = []
    worker = threading.Thread(target=lambda: got.append(cpu_product(left, right)))
    worker.start()
    worker.join()
    assert np.array_equal(got[0], left.astype(np.int64) @ right.T.astype(np.int64))
    assert blas_threads() == before


def test_cpu_product_leaves_the_blas_thread_count_as_it_was():
    from threadpoolctl import threadpool_info

    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    cpu_product(np.ones((600, 4), np.float32), np.ones((3, 4), np.float32))
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == before


@pytest.fixture
def clustered_rows() -> np.ndarray:
    """[600, 24] float32 rows around 12 centres, with exact duplicates and a zero row: ties the
    engine must break by id, the same way wherever the products ran."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, 24))
    rows = centres[rng.integers(0, 12, 600)] + 0.05 * rng.standard_normal((600, 24))
    rows[10:20] = rows[0]
    rows[33] = 0.0
    return rows.astype(np.float32)


def same_neighbours(a, b) -> bool:
    return np.array_equal(a.ids, b.ids) and a.cosines.tobytes() == b.cosines.tobytes()


def test_knn_graph_on_the_device_path_is_the_numpy_graph(clustered_rows):
    unit = unit_rows(clustered_rows)
    expected = knn_graph(unit, 7, block_rows=128)
    with computing_on(DEVICE_UNDER_TEST):
        with mock.patch.object(Resident, "hits_between", autospec=True, side_effect=Resident.hits_between) as hits:
            assert same_neighbours(knn_graph(unit, 7, block_rows=128), expected)
        assert hits.call_count == 10  # the tiles above the diagonal of a 5 x 5 grid screened on the device
        assert same_neighbours(knn_graph(unit, 7, block_rows=600), expected)


def test_knn_graph_with_cut_diagonal_tiles_on_the_device_path_is_the_numpy_graph(clustered_rows):
    # Parts of 32 rows: each 128-row diagonal tile is multiplied as 10 sub-tiles, on the device path too.
    unit = unit_rows(clustered_rows)
    expected = knn_graph(unit, 7, block_rows=128)
    with mock.patch.object(knn, "MIN_PART_ROWS", 32):
        assert len(knn.diagonal_parts(np.arange(128), 7)) == 4
        assert same_neighbours(knn_graph(unit, 7, block_rows=128), expected)
        with computing_on(DEVICE_UNDER_TEST):
            assert same_neighbours(knn_graph(unit, 7, block_rows=128), expected)


def test_nearest_keys_on_the_device_path_are_the_numpy_ones(clustered_rows):
    unit = unit_rows(clustered_rows)
    queries, exclude = unit[:40], excluding_own(np.arange(40))
    expected = nearest_keys(queries, unit, 5, block_rows=100, exclude=exclude)
    with computing_on(DEVICE_UNDER_TEST):
        assert same_neighbours(nearest_keys(queries, unit, 5, block_rows=100, exclude=exclude), expected)


def test_bounded_screen_on_the_device_path_is_the_numpy_answer(clustered_rows):
    unit = unit_rows(clustered_rows)

    def search():
        top = TopK(unit[:50], 6, excluding_own(np.arange(50)), screen="bfloat16", keep=12)
        for start in range(0, len(clustered_rows), 128):
            top.add(start, clustered_rows[start : start + 128])
        return top, top.finish()

    top_cpu, expected = search()
    with computing_on(DEVICE_UNDER_TEST):
        top_device, found = search()
    assert top_device.screen.rounded_on_device is not None and top_cpu.screen.rounded_on_device is None
    assert top_device.bound_held and same_neighbours(found, expected)
    assert np.array_equal(top_device.candidate_ids, top_cpu.candidate_ids)


def test_pca_on_the_device_path_publishes_the_numpy_coordinates():
    # The covariance's float32 block products differ in their last bits between the two paths,
    # as between BLAS kernels; the refined axes and the published grid absorb that.
    rng = np.random.default_rng(5)
    scales = 1.5 ** -np.arange(48)
    matrix = (rng.standard_normal((6000, 48)) * scales + rng.standard_normal(48)).astype(np.float32)  # [6000, 48]
    expected = fit_pca(matrix, n_components=10, block_rows=1000)
    with computing_on(DEVICE_UNDER_TEST):
        found = fit_pca(matrix, n_components=10, block_rows=1000)
    assert found.transform(matrix).tobytes() == expected.transform(matrix).tobytes()
    assert np.allclose(found.explained_variance, expected.explained_variance, rtol=1e-6, atol=0)
    assert np.array_equal(np.round(found.explained_variance_ratio, 4), np.round(expected.explained_variance_ratio, 4))
