"""Invariants the speed work relies on (no timings here: benchmarks/run.py measures those)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.formats import read_embedding
from pipeline.core.parquet import read_vectors, vector_array, write_table

REPO = Path(__file__).resolve().parent.parent


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_stages_that_do_not_need_torch_do_not_import_it():
    code = (
        "import sys\n"
        "import pipeline.stages.stats, pipeline.stages.words, pipeline.stages.similarity, pipeline.stages.pca, pipeline.core.knn, pipeline.core.parquet\n"
        "import pipeline.stages.quantize, pipeline.formats\n"
        "print('torch' in sys.modules)"
    )
    assert _run(code) == "False"


def test_meta_checkpoint_is_read_without_importing_torch(tmp_path):
    torch = pytest.importorskip("torch")
    table = (torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8) / 7).to(torch.bfloat16)
    torch.save({"tok_embeddings.weight": table, "norm.weight": torch.ones(8)}, tmp_path / "consolidated.00.pth")
    code = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from pipeline.formats import read_embedding\n"
        f"e = read_embedding('meta', Path({str(tmp_path)!r}))\n"
        "print('torch' in sys.modules, e.source.source_dtype, e.matrix.shape, float(e.matrix.sum()))"
    )
    expected = float(table.float().sum())
    assert _run(code) == f"False bfloat16 (6, 8) {expected}"


def test_meta_fast_path_equals_torch_for_every_dtype_and_offset(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.randn(10, 16)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        big = base.to(dtype)
        # A view into a larger storage: the tensor starts at an offset inside it.
        state = {"other": big[:3].clone(), "tok_embeddings.weight": torch.cat([big, big])[10:]}
        torch.save(state, tmp_path / "consolidated.00.pth")
        matrix = read_embedding("meta", tmp_path).matrix
        assert np.array_equal(matrix, big.to(torch.float32).numpy()), dtype


def test_gguf_extract_parses_the_header_once(smollm2_gguf, monkeypatch):
    from pipeline.formats import gguf_file
    from pipeline.tokenizers.load import load_tokenizer

    calls = []
    original = gguf_file.parse
    monkeypatch.setattr(gguf_file, "parse", lambda *args: calls.append(1) or original(*args))
    gguf_file._read_cached.cache_clear()
    read_embedding("gguf", smollm2_gguf)
    load_tokenizer("gguf", smollm2_gguf)
    read_embedding("gguf", smollm2_gguf)
    assert len(calls) == 1


def test_parallel_read_vectors_keeps_row_order(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((1000, 12)).astype(np.float32)
    table = pa.table({"token_id": pa.array(np.arange(1000, dtype=np.int32)), "vector": vector_array(matrix)})
    write_table(tmp_path / "v.parquet", table, {"stage": "test"}, row_group_size=64)
    token_ids, read = read_vectors(tmp_path / "v.parquet")
    assert np.array_equal(token_ids, np.arange(1000)) and np.array_equal(read, matrix)


@pytest.mark.parametrize("name", ["int8_tensor_fixed", "int8_tensor", "int8_row", "q8_0", "q4_0", "nf4", "fp16", "bf16"])
def test_threaded_encoding_equals_one_call(name):
    from pipeline.quant import schemes_for
    from pipeline.stages.quantize import encode_decode, encode_rows

    rows = np.random.default_rng(1).standard_normal((1500, 128)).astype(np.float32) * 0.5
    scheme = schemes_for([name], 128)[0].fit(rows)
    whole = scheme.encode(rows)
    split = encode_rows(scheme, rows)
    assert np.array_equal(whole.codes, split.codes) and whole.clipped == split.clipped
    assert (whole.scales is None and split.scales is None) or np.array_equal(whole.scales, split.scales)
    _, restored = encode_decode(scheme, rows)
    assert np.array_equal(restored, scheme.decode(whole))


@pytest.mark.parametrize("name", ["fp16", "bf16", "q8_0", "int8_row", "q4_0"])
def test_pruned_recall_equals_the_full_pass(name):
    from pipeline.quant import schemes_for
    from pipeline.quant.recall import PRUNE_MIN_ROWS, Queries, WordQuery, reference, sample_token_rows
    from pipeline.stages.quantize import SchemeRun
    from pipeline.core.determinism import row_norms
    from pipeline.quant.measure import inverse_of_norms
    from pipeline.quant.layout import quant_schema

    rng = np.random.default_rng(3)
    rows = PRUNE_MIN_ROWS + 1000
    matrix = rng.standard_normal((rows, 32)).astype(np.float32)
    matrix[::97] *= 3  # some structure in the norms
    matrix[5] = 0.0
    queries = Queries(sample_token_rows(inverse_of_norms(row_norms(matrix)), 60, 0), [WordQuery("w", (7, 11))])
    ref = reference(matrix, queries, 10, "float32")
    assert ref.candidate_ids is not None
    scheme = schemes_for([name], 32)[0].fit(matrix)
    schema = quant_schema(scheme, 32)
    runs = {}
    for mode, given in (("pruned", ref), ("full", None)):
        run = SchemeRun(scheme, matrix, queries, 10, given)
        for _ in run.batches(schema):
            pass
        runs[mode] = run
    assert [set(r) for r in runs["pruned"].neighbours] == [set(r) for r in runs["full"].neighbours]
    if name in ("fp16", "bf16", "q8_0"):
        assert runs["pruned"].pruned  # the fine schemes take the cheap path


def test_pruned_pass_gives_way_to_the_full_search_when_later_rows_move_more():
    from pipeline.core.determinism import row_norms
    from pipeline.quant import schemes_for
    from pipeline.quant.layout import ROWS_PER_CHUNK, quant_schema
    from pipeline.quant.recall import PRUNE_MIN_ROWS, Queries, WordQuery, reference
    from pipeline.stages.quantize import SchemeRun

    rng = np.random.default_rng(8)
    matrix = rng.standard_normal((PRUNE_MIN_ROWS + 500, 32)).astype(np.float32)
    matrix[3 * ROWS_PER_CHUNK :] *= 0.02  # rows the per-tensor int8 scale rounds coarsely
    queries = Queries(np.arange(0, 600, 10, dtype=np.int64), [WordQuery("w", (7, 11))])  # all in the first chunk
    assert row_norms(matrix[queries.token_rows]).min() > 1
    ref = reference(matrix, queries, 10, "float32")
    scheme = schemes_for(["int8_tensor"], 32)[0].fit(matrix)
    runs = {}
    for mode, given in (("switched", ref), ("full", None)):
        run = SchemeRun(scheme, matrix, queries, 10, given)
        for _ in run.batches(quant_schema(scheme, 32)):
            pass
        runs[mode] = run
    assert runs["switched"].screen_before == 3 * ROWS_PER_CHUNK  # pruned until the first coarse chunk
    assert runs["switched"].neighbours.tolist() == runs["full"].neighbours.tolist()
    assert runs["switched"].errors.summary() == runs["full"].errors.summary()
