"""The ONNX reader: hand-built graphs with known matrices, then the two packaged ONNX models.

Every expected matrix is computed independently of the reader: from the numbers the test
put in, or from ``onnx.numpy_helper`` and numpy arithmetic on the loaded model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.errors import DissectError
from pipeline.formats import read_embedding, weight_files

ROWS, DIM = 6, 4
RNG = np.random.default_rng(7)
FLOATS = RNG.normal(size=(ROWS, DIM)).astype(np.float32)  # [vocab, dim]
CODES = RNG.integers(-127, 128, size=(ROWS, DIM)).astype(np.int8)  # [vocab, dim]
UCODES = RNG.integers(0, 256, size=(ROWS, DIM)).astype(np.uint8)
ROW_SCALES = np.array([0.5, 0.25, 0.125, 1.0, 2.0, 0.0625], np.float32)  # [vocab], exact products


def initializer(name: str, values: np.ndarray, raw: bool = True) -> TensorProto:
    return numpy_helper.from_array(values, name) if raw else helper.make_tensor(
        name, helper.np_dtype_to_tensor_dtype(values.dtype), values.shape, values.ravel().tolist())


def save(tmp_path: Path, nodes: list, initializers: list, inputs: tuple[str, ...] = ("input_ids",), name: str = "model.onnx",
         **save_options) -> Path:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(i, TensorProto.INT64, ["batch", "seq"]) for i in inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / name
    onnx.save_model(model, str(path), **save_options)
    return path


def gather(table: str, ids: str = "input_ids", out: str = "out") -> onnx.NodeProto:
    return helper.make_node("Gather", [table, ids], [out])


# ---- stored as floats ---------------------------------------------------------------------


def test_float32_table_is_found_by_its_gather(tmp_path):
    path = save(tmp_path, [gather("embeddings.word_embeddings.weight")],
                [initializer("embeddings.word_embeddings.weight", FLOATS), initializer("unused", np.ones((9, 9), np.float32))])
    embedding = read_embedding("onnx", path)
    assert np.array_equal(embedding.matrix, FLOATS) and embedding.matrix.dtype == np.float32
    assert embedding.source.tensor_key == "embeddings.word_embeddings.weight"
    assert embedding.source.source_dtype == "float32" and embedding.source.shape == (ROWS, DIM)
    assert read_embedding("onnx", tmp_path).source.files == (path,)  # a folder with one .onnx


def test_float16_and_bfloat16_widen_exactly(tmp_path):
    half = FLOATS.astype(np.float16)
    bits = (FLOATS.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 by truncation
    bf16 = helper.make_tensor("w", TensorProto.BFLOAT16, [ROWS, DIM], bits.tobytes(), raw=True)
    path = save(tmp_path, [gather("w")], [bf16])
    embedding = read_embedding("onnx", path)
    assert np.array_equal(embedding.matrix, (bits.astype(np.uint32) << 16).view(np.float32))
    assert embedding.source.source_dtype == "bfloat16"
    path = save(tmp_path, [gather("w")], [initializer("w", half)], name="half.onnx")
    embedding = read_embedding("onnx", path)
    assert np.array_equal(embedding.matrix, half.astype(np.float32)) and embedding.source.source_dtype == "float16"


def test_values_in_typed_fields_rather_than_raw_bytes(tmp_path):
    path = save(tmp_path, [gather("w")], [initializer("w", FLOATS, raw=False)])
    assert np.array_equal(read_embedding("onnx", path).matrix, FLOATS)


def test_gather_fed_by_a_renamed_and_cast_input_and_the_largest_table_wins(tmp_path):
    nodes = [
        helper.make_node("Identity", ["ids"], ["ids_renamed"]),
        helper.make_node("Cast", ["ids_renamed"], ["ids_int32"], to=TensorProto.INT32),
        helper.make_node("Identity", ["vocab_table"], ["vocab_table_alias"]),
        gather("vocab_table_alias", "ids_int32", "tokens"),
        gather("segment_table", "segments", "segment"),  # a smaller table on another input
        gather("position_table", "positions_const", "position"),  # not indexed by an input
        helper.make_node("Add", ["tokens", "segment"], ["out"]),
    ]
    inits = [initializer("vocab_table", FLOATS), initializer("segment_table", FLOATS[:2]),
             initializer("position_table", np.zeros((50, DIM), np.float32)), initializer("positions_const", np.arange(3))]
    path = save(tmp_path, nodes, inits, inputs=("ids", "segments"))
    embedding = read_embedding("onnx", path)
    assert embedding.source.tensor_key == "vocab_table" and np.array_equal(embedding.matrix, FLOATS)
    # tensor: overrides the choice
    assert read_embedding("onnx", path, "position_table").source.shape == (50, DIM)


# ---- quantized ------------------------------------------------------------------------------


def dequantize_linear(codes: str, scale: str, zero: str | None, axis: int | None) -> onnx.NodeProto:
    extra = {} if axis is None else {"axis": axis}
    return helper.make_node("DequantizeLinear", [codes, scale] + ([zero] if zero else []), ["table"], **extra)


@pytest.mark.parametrize(
    "codes, scale, zero, axis, expected_label",
    [
        (CODES, np.float32(0.03125), None, None, "int8 per-tensor scale"),
        (CODES, np.float32(0.03125), np.int8(3), None, "int8 per-tensor scale + zero point"),
        (CODES, ROW_SCALES, np.zeros(ROWS, np.int8), 0, "int8 per-row scale"),  # an all-zero zero point is no zero point
        (UCODES, ROW_SCALES, np.arange(ROWS, dtype=np.uint8) + 120, 0, "uint8 per-row scale + zero point"),
        (CODES, np.array([0.5, 0.25, 2.0, 1.0], np.float32), None, 1, "int8 per-column scale"),
    ],
)
def test_dequantize_linear_per_tensor_row_and_column(tmp_path, codes, scale, zero, axis, expected_label):
    inits = [initializer("w_q", codes), initializer("w_scale", np.asarray(scale))]
    if zero is not None:
        inits.append(initializer("w_zero", np.asarray(zero)))
    nodes = [dequantize_linear("w_q", "w_scale", "w_zero" if zero is not None else None, axis), gather("table")]
    path = save(tmp_path, nodes, inits)
    embedding = read_embedding("onnx", path)
    # the definition: y = (x - zero_point) * scale, broadcast along `axis`
    shape = (1, 1) if np.ndim(scale) == 0 else ((ROWS, 1) if axis == 0 else (1, DIM))
    zero_values = 0 if zero is None else np.asarray(zero, np.float32).reshape(shape)
    expected = (codes.astype(np.float32) - zero_values) * np.asarray(scale, np.float32).reshape(shape)
    assert np.array_equal(embedding.matrix, expected)
    assert embedding.source.source_dtype == expected_label and embedding.source.tensor_key == "w_q"


def test_codes_times_scale_arithmetic_as_exporters_write_it(tmp_path):
    # the published int8 MiniLM's pattern: Cast(weight_q) * weight_scale [rows, 1]
    nodes = [
        helper.make_node("Cast", ["emb.weight_q"], ["emb.weight_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["emb.weight_f", "emb.weight_scale"], ["emb.weight"]),
        gather("emb.weight"),
    ]
    inits = [initializer("emb.weight_q", CODES), initializer("emb.weight_scale", ROW_SCALES.reshape(ROWS, 1))]
    embedding = read_embedding("onnx", save(tmp_path, nodes, inits))
    assert np.array_equal(embedding.matrix, CODES.astype(np.float32) * ROW_SCALES[:, None])
    assert embedding.source.source_dtype == "int8 per-row scale" and embedding.source.tensor_key == "emb.weight_q"


def test_scale_first_and_a_zero_point_subtracted(tmp_path):
    nodes = [
        helper.make_node("Cast", ["q"], ["q_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["q_f", "zero"], ["centred"]),
        helper.make_node("Mul", ["scale", "centred"], ["table"]),
        gather("table"),
    ]
    zero = np.full((ROWS, 1), 128.0, np.float32)
    inits = [initializer("q", UCODES), initializer("scale", ROW_SCALES.reshape(ROWS, 1)), initializer("zero", zero)]
    embedding = read_embedding("onnx", save(tmp_path, nodes, inits))
    assert np.array_equal(embedding.matrix, (UCODES.astype(np.float32) - 128.0) * ROW_SCALES[:, None])
    assert embedding.source.source_dtype == "uint8 per-row scale + zero point"


def test_tensor_naming_the_codes_gives_the_dequantized_matrix(tmp_path):
    nodes = [dequantize_linear("w_q", "w_scale", None, 0), gather("table")]
    path = save(tmp_path, nodes, [initializer("w_q", CODES), initializer("w_scale", ROW_SCALES)])
    for name in ("w_q", "table"):
        embedding = read_embedding("onnx", path, name)
        assert np.array_equal(embedding.matrix, CODES.astype(np.float32) * ROW_SCALES[:, None]), name
    with pytest.raises(DissectError, match="closest names: .*'w_q'.*set `tensor:`"):
        read_embedding("onnx", path, "word_embeddings")


def test_a_scale_that_is_not_per_tensor_row_or_column_is_refused(tmp_path):
    nodes = [helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["qf", "s"], ["t"]), gather("t")]
    path = save(tmp_path, nodes, [initializer("q", CODES), initializer("s", np.ones((2, 2), np.float32))])
    with pytest.raises(DissectError, match="not per tensor, per row or per column"):
        read_embedding("onnx", path)


# ---- external data -------------------------------------------------------------------------


def external_model(tmp_path: Path, quantized: bool = False) -> Path:
    if quantized:
        nodes = [dequantize_linear("w_q", "w_scale", None, 0), gather("table")]
        inits = [initializer("w_q", CODES), initializer("w_scale", ROW_SCALES)]
    else:
        nodes, inits = [gather("w")], [initializer("w", FLOATS)]
    return save(tmp_path, nodes, inits, save_as_external_data=True, all_tensors_to_one_file=True,
                location="model.onnx.data", size_threshold=0)


@pytest.mark.parametrize("quantized", [False, True])
def test_external_data_is_memory_mapped_and_listed(tmp_path, quantized):
    path = external_model(tmp_path, quantized)
    data = tmp_path / "model.onnx.data"
    assert data.is_file() and FLOATS.tobytes() not in path.read_bytes()
    embedding = read_embedding("onnx", path)
    expected = CODES.astype(np.float32) * ROW_SCALES[:, None] if quantized else FLOATS
    assert np.array_equal(embedding.matrix, expected)
    assert embedding.source.files == (path, data)
    assert weight_files("onnx", path) == [path, data]
    # the independent read: onnx itself, external data loaded
    model = onnx.load(str(path))
    table = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.array_equal(table["w_q"].astype(np.float32) * table["w_scale"][:, None] if quantized else table["w"], expected)


def rewrite_external(path: Path, **changes: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key in changes:
                entry.value = changes[entry.key]
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"offset": "1000000"}, "lies outside"),
        ({"length": "8"}, "not the 96"),
        ({"offset": "x"}, "malformed external offset"),
        ({"location": "../elsewhere.data"}, "not a file beside the model"),
        ({"location": "/etc/passwd"}, "not a file beside the model"),
        ({"location": "gone.data"}, "is missing"),
    ],
)
def test_lying_external_data_is_refused(tmp_path, changes, message):
    path = external_model(tmp_path)
    rewrite_external(path, **changes)
    with pytest.raises(DissectError, match=message):
        read_embedding("onnx", path)


# ---- bad input -----------------------------------------------------------------------------


def test_no_gather_on_the_ids_names_the_fix(tmp_path):
    nodes = [helper.make_node("Add", ["input_ids", "input_ids"], ["out"])]
    path = save(tmp_path, nodes, [initializer("model.embeddings.word_embeddings.weight", FLOATS)])
    with pytest.raises(DissectError, match=r"no Gather .*'input_ids'.*closest names: 'model.embeddings.word_embeddings.weight'.*set `tensor:`"):
        read_embedding("onnx", path)
    assert np.array_equal(read_embedding("onnx", path, "model.embeddings.word_embeddings.weight").matrix, FLOATS)


def test_two_tables_of_one_size_on_the_inputs_are_ambiguous(tmp_path):
    path = save(tmp_path, [gather("a", "x", "o1"), gather("b", "y", "out")],
                [initializer("a", FLOATS), initializer("b", FLOATS)], inputs=("x", "y"))
    with pytest.raises(DissectError, match="several tables of 6 rows.*set `tensor:`"):
        read_embedding("onnx", path)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_truncated_model_is_a_clear_error(tmp_path, fraction):
    whole = save(tmp_path, [gather("w")], [initializer("w", FLOATS)]).read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(whole[: int(len(whole) * fraction)])
    with pytest.raises(DissectError) as caught:
        read_embedding("onnx", path)
    assert "\n" not in str(caught.value)


def test_a_matrix_shorter_than_its_shape_is_refused(tmp_path):
    tensor = initializer("w", FLOATS)
    tensor.raw_data = FLOATS.tobytes()[:-4]
    with pytest.raises(DissectError, match="holds 92 bytes, not the 96"):
        read_embedding("onnx", save(tmp_path, [gather("w")], [tensor]))


def test_integer_table_types_that_are_not_8_bit_are_refused(tmp_path):
    path = save(tmp_path, [gather("w")], [initializer("w", np.ones((ROWS, DIM), np.int32))])
    with pytest.raises(DissectError, match="is int32, not a type this reader supports"):
        read_embedding("onnx", path)


# ---- the packaged ONNX models ------------------------------------------------------------------


def independent_matrix(path: Path, codes: str, scale: str | None = None) -> np.ndarray:
    tables = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    values = numpy_helper.to_array(tables[codes])
    return values if scale is None else values.astype(np.float32) * numpy_helper.to_array(tables[scale])


def test_paraphrase_minilm_l3_matches_numpy_helper(paraphrase_onnx):
    embedding = read_embedding("onnx", paraphrase_onnx)
    key = "model.0.auto_model.embeddings.word_embeddings.weight"
    assert embedding.source.tensor_key == key and embedding.source.source_dtype == "float32"
    assert embedding.source.shape == (30522, 384)
    assert np.array_equal(embedding.matrix, independent_matrix(paraphrase_onnx, key))


def test_published_int8_minilm_matches_numpy_helper(minilm_int8_onnx):
    embedding = read_embedding("onnx", minilm_int8_onnx)
    assert embedding.source.tensor_key == "inner.embeddings.word_embeddings.weight_q"
    assert embedding.source.source_dtype == "int8 per-row scale" and embedding.source.shape == (30522, 384)
    expected = independent_matrix(minilm_int8_onnx, "inner.embeddings.word_embeddings.weight_q",
                                  "inner.embeddings.word_embeddings.weight_scale")
    assert np.array_equal(embedding.matrix, expected)


def extracted_versions(root: Path, minilm_dir: Path, onnx_files: dict[str, Path]) -> dict[str, Path]:
    """fetch + extract of minilm-l6 and ONNX versions of it borrowing its tokenizer; embeddings.parquet per model."""
    import os

    from pipeline.core.params import model_config
    from pipeline.core.paths import ModelPaths
    from pipeline.stages import extract, fetch
    from tests.conftest import model_conf

    models = {"minilm-l6": {"format": "safetensors", "source": {"path": str(minilm_dir)}}}
    for name, path in onnx_files.items():
        models[name] = {**model_conf(name), "source": {"path": str(path)}}
        assert models[name]["tokenizer"] == {"from": "minilm-l6"}
    params = {"models": models, "extract": {"row_group_size": 4096, "compression_level": 3}}
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for name in models:
            paths = ModelPaths.in_project(name, root)
            fetch.run(paths, model_config(params, name))
            extract.run(paths, extract.read_settings(params, name))
    finally:
        os.chdir(cwd)
    return {name: ModelPaths.in_project(name, root).embeddings for name in models}


def test_real_versions_of_minilm_end_to_end(tmp_path, minilm_dir, paraphrase_onnx, minilm_int8_onnx):
    """Both packaged ONNX models through fetch and extract with minilm-l6's tokenizer, and how far they are from it."""
    from pipeline.core.parquet import read_provenance, read_vectors
    from pipeline.stages.drift import relative_frobenius, row_changes

    files = extracted_versions(tmp_path, minilm_dir, {"paraphrase-minilm-l3": paraphrase_onnx, "minilm-l6-int8": minilm_int8_onnx})
    tokens = {name: pq_tokens(path) for name, path in files.items()}
    assert tokens["paraphrase-minilm-l3"] == tokens["minilm-l6"] == tokens["minilm-l6-int8"]
    assert read_provenance(files["minilm-l6-int8"])["source_dtype"] == "int8 per-row scale"
    assert read_provenance(files["paraphrase-minilm-l3"])["tokenizer"]["from"] == "minilm-l6"
    base = read_vectors(files["minilm-l6"])[1]
    int8 = read_vectors(files["minilm-l6-int8"])[1]
    assert np.array_equal(int8, independent_matrix(minilm_int8_onnx, "inner.embeddings.word_embeddings.weight_q",
                                                   "inner.embeddings.word_embeddings.weight_scale"))
    cosine, l2, _ = row_changes(base, int8)
    assert 0.006 < relative_frobenius(l2, base) < 0.008 and 0.999 < cosine.min() < 0.9996
    paraphrase = read_vectors(files["paraphrase-minilm-l3"])[1]
    cosine, l2, _ = row_changes(base, paraphrase)
    assert 0.45 < relative_frobenius(l2, base) < 0.53 and 0.85 < cosine.mean() < 0.91


def pq_tokens(path: Path) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["token"]).column("token").to_pylist()


def test_published_int8_is_our_int8_row_scheme(minilm_dir, minilm_int8_onnx):
    """Same scheme (per-row absmax / 127, symmetric), the same scales, nearly every code equal (39 of 11.7 M differ)."""
    from pipeline.formats import read_embedding as read
    from pipeline.quant import SCHEMES

    tables = {t.name: t for t in onnx.load(str(minilm_int8_onnx)).graph.initializer}
    published_codes = numpy_helper.to_array(tables["inner.embeddings.word_embeddings.weight_q"])
    published_scales = numpy_helper.to_array(tables["inner.embeddings.word_embeddings.weight_scale"])  # [30522, 1]
    ours = SCHEMES["int8_row"]().encode(np.asarray(read("safetensors", minilm_dir).matrix))
    assert np.array_equal(ours.scales, published_scales)  # bit for bit
    assert (np.abs(published_codes).max(axis=1) == 127).all()  # absmax maps to 127 in every row
    differ = ours.codes != published_codes
    assert differ.sum() < 100 and np.abs(ours.codes.astype(int) - published_codes).max() == 1  # rounding near a half only
