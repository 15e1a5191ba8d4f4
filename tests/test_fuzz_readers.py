"""Hostile safetensors headers, Meta checkpoints, ONNX models, JSON and GGUF tables: only DissectError comes out (hypothesis).

A longer run: EMBEDDING_DISSECT_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_readers.py
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.errors import DissectError
from pipeline.formats import read_embedding
from pipeline.formats.checks import MAX_JSON_DEPTH, JSONProblem, parse_json
from pipeline.formats.gguf_file import parse as parse_gguf

FUZZ_EXAMPLES = int(os.environ.get("EMBEDDING_DISSECT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "Q4", 3]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3) | json_values,
    }
)


def expect_only_dissect_error(fmt: str, path: Path) -> None:
    try:
        read_embedding(fmt, path)
    except DissectError:
        pass


@FUZZ
@given(entries=st.dictionaries(st.sampled_from(["model.embed_tokens.weight", "x", "__metadata__"]), tensor_entries | json_values, max_size=3),
       data=st.binary(max_size=64), length_delta=st.integers(-4, 4))
def test_fuzzed_safetensors_headers(tmp_path, entries, data, length_delta):
    encoded = json.dumps(entries).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(encoded) + length_delta)) + encoded + data)
    expect_only_dissect_error("safetensors", path)


@pytest.fixture(scope="module")
def checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"tok_embeddings.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3), "norm.weight": torch.ones(3)}, buffer)
    return buffer.getvalue()


@FUZZ
@given(data=st.data())
def test_fuzzed_meta_checkpoints(tmp_path, checkpoint_bytes, data):
    blob = bytearray(checkpoint_bytes)
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(blob)), st.integers(0, len(blob))))
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "consolidated.00.pth").write_bytes(bytes(blob[:cut]))
    expect_only_dissect_error("meta", folder)


def onnx_model(external: bool = False):
    """A small int8 per-row model (Cast * scale, as exporters write it): codes [8, 4], scale [8, 1]."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT), helper.make_node("Mul", ["w_f", "w_scale"], ["w"]),
             helper.make_node("Gather", ["w", "input_ids"], ["out"])]
    inits = [numpy_helper.from_array(np.arange(32, dtype=np.int8).reshape(8, 4), "w_q"),
             numpy_helper.from_array(np.full((8, 1), 0.5, np.float32), "w_scale")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    if external:
        from onnx.external_data_helper import convert_model_to_external_data

        convert_model_to_external_data(model, all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    return model


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    return onnx_model().SerializeToString()


@pytest.fixture(scope="module")
def onnx_external_bytes(tmp_path_factory) -> tuple[bytes, bytes]:
    """(model bytes, model.onnx.data bytes) of the same model with its tensors stored outside."""
    from onnx.external_data_helper import write_external_data_tensors

    folder = tmp_path_factory.mktemp("onnx-external")
    model = write_external_data_tensors(onnx_model(external=True), str(folder))
    return model.SerializeToString(), (folder / "model.onnx.data").read_bytes()


@FUZZ
@given(data=st.data(), external=st.booleans())
def test_fuzzed_onnx_models(tmp_path, onnx_bytes, onnx_external_bytes, data, external):
    """Damaged model bytes, the tensors inside the file or in an external data file beside it."""
    if external:
        (tmp_path / "model.onnx.data").write_bytes(onnx_external_bytes[1])
    blob = bytearray(onnx_external_bytes[0] if external else onnx_bytes)
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(blob)), st.integers(0, len(blob))))
    path = tmp_path / "model.onnx"
    path.write_bytes(bytes(blob[:cut]))
    expect_only_dissect_error("onnx", path)


@FUZZ
@given(entries=st.dictionaries(st.sampled_from(["location", "offset", "length", "checksum"]),
                               st.sampled_from(["model.onnx.data", "../x", "/etc/hostname", "", "nul\x00"]) |
                               st.integers(-(2**40), 2**40).map(str) | st.text(max_size=6), max_size=4),
       data=st.binary(max_size=80))
def test_fuzzed_onnx_external_data(tmp_path, entries, data):
    model = onnx_model(external=True)
    for tensor in model.graph.initializer:
        del tensor.external_data[:]
        for key, value in entries.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "model.onnx.data").write_bytes(data)
    expect_only_dissect_error("onnx", tmp_path / "model.onnx")


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_truncated_files_of_each_format(tmp_path, checkpoint_bytes, onnx_bytes, fraction):
    from safetensors.numpy import save

    safetensors_bytes = save({"model.embed_tokens.weight": np.ones((64, 8), np.float32)})
    for name, fmt, whole in [("consolidated.00.pth", "meta", checkpoint_bytes), ("model.safetensors", "safetensors", safetensors_bytes),
                             ("model.onnx", "onnx", onnx_bytes)]:
        folder = tmp_path / fmt
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(whole[: int(len(whole) * fraction)])
        with pytest.raises(DissectError):
            read_embedding(fmt, folder)


# ---- JSON depth and duplicate keys (every JSON a model folder holds) ------------------------

def nested(depth: int, kinds: list[bool], leaf: str) -> str:
    """JSON nested ``depth`` levels: arrays or objects by ``kinds`` (cycled), strings full of brackets at the leaf."""
    opening = "".join('{"k":' if kinds[i % len(kinds)] else "[" for i in range(depth))
    closing = "".join("}" if kinds[i % len(kinds)] else "]" for i in reversed(range(depth)))
    return opening + json.dumps(leaf) + closing


@FUZZ
@given(depth=st.integers(0, 3 * MAX_JSON_DEPTH), kinds=st.lists(st.booleans(), min_size=1, max_size=4),
       leaf=st.text(alphabet="[]{}\\\"ab", max_size=12))
def test_fuzzed_json_depth_is_refused_exactly_past_the_limit(depth, kinds, leaf):
    text = nested(depth, kinds, leaf)
    if depth <= MAX_JSON_DEPTH:
        assert parse_json(text.encode()) == json.loads(text)
    else:
        with pytest.raises(JSONProblem, match="nested deeper"):
            parse_json(text.encode())


@FUZZ
@given(depth=st.integers(MAX_JSON_DEPTH - 2, 4 * MAX_JSON_DEPTH), kinds=st.lists(st.booleans(), min_size=1, max_size=4),
       where=st.sampled_from(["header", "index", "params"]))
def test_fuzzed_deep_json_in_any_model_file_only_raises_dissect_error(tmp_path, checkpoint_bytes, depth, kinds, where):
    deep = ('{"x": ' + nested(depth, kinds, "") + "}").encode()
    folder = tmp_path / where
    folder.mkdir(exist_ok=True)
    if where == "header":
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    elif where == "index":
        (folder / "model.safetensors.index.json").write_bytes(deep)
    else:
        (folder / "consolidated.00.pth").write_bytes(checkpoint_bytes)
        (folder / "params.json").write_bytes(deep)
    expect_only_dissect_error("meta" if where == "params" else "safetensors", folder)


@FUZZ
@given(pairs=st.lists(st.tuples(st.sampled_from(["a", "b", "model.embed_tokens.weight", "__metadata__"]), json_values), max_size=5))
def test_fuzzed_duplicate_keys_are_refused_exactly_when_present(tmp_path, pairs):
    text = "{" + ", ".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in pairs) + "}"
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        with pytest.raises(JSONProblem, match="appears twice"):
            parse_json(text.encode())
    else:
        assert parse_json(text.encode()) == dict(pairs)
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(text.encode())) + text.encode() + b"\0" * 48)
    expect_only_dissect_error("safetensors", path)


# ---- GGUF duplicates ----------------------------------------------------------------------------

def gguf_with(tensor_names: list[str], metadata_keys: list[str]) -> bytes:
    """GGUF v3 with u32 metadata under ``metadata_keys`` and an F32 [1, 32] tensor per name (aligned)."""
    kv = b"".join(struct.pack("<Q", len(k.encode())) + k.encode() + struct.pack("<II", 4, 7) for k in metadata_keys)
    infos = b"".join(struct.pack("<Q", len(n.encode())) + n.encode() + struct.pack("<IQQIQ", 2, 32, 1, 0, i * 128)
                     for i, n in enumerate(tensor_names))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensor_names), len(metadata_keys)) + kv + infos
    return head + b"\0" * (-len(head) % 32) + b"\0" * (128 * len(tensor_names))


@FUZZ
@given(tensors=st.lists(st.sampled_from(["token_embd.weight", "output.weight", "t"]), max_size=4),
       keys=st.lists(st.sampled_from(["general.name", "llama.block_count", "k"]), max_size=4))
def test_fuzzed_gguf_duplicates_are_refused_exactly_when_present(tensors, keys):
    data = gguf_with(tensors, keys)
    if len(set(tensors)) < len(tensors) or len(set(keys)) < len(keys):
        with pytest.raises(DissectError, match="appears twice"):
            parse_gguf(data, len(data), Path("dup.gguf"))
    else:
        contents = parse_gguf(data, len(data), Path("ok.gguf"))
        assert sorted(contents.tensors) == sorted(tensors) and sorted(contents.metadata) == sorted(keys)
