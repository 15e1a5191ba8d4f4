"""The GGUF header parser: equal to the gguf package on a real file, and hostile input only
ever ends in DissectError (fuzzed with hypothesis)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.errors import DissectError
from pipeline.formats.gguf_file import parse, read_gguf

# A longer fuzzing run: EMBEDDING_DISSECT_FUZZ_EXAMPLES=20000 pytest tests/test_gguf_file.py
FUZZ_EXAMPLES = int(os.environ.get("EMBEDDING_DISSECT_FUZZ_EXAMPLES", "300"))


def small_gguf_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "<s>"])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(3)
    writer.add_tensor("token_embd.weight", np.arange(4 * 32, dtype=np.float32).reshape(4, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> bytes:
    return small_gguf_bytes(tmp_path_factory.mktemp("gguf"))


def test_matches_the_gguf_package_on_the_real_model(smollm2_gguf):
    ours = read_gguf(smollm2_gguf)
    reference = gguf.GGUFReader(smollm2_gguf)
    assert set(ours.tensors) == {t.name for t in reference.tensors}
    for tensor in reference.tensors:
        info = ours.tensors[tensor.name]
        assert (info.offset, info.nbytes, info.type_id) == (tensor.data_offset, tensor.n_bytes, int(tensor.tensor_type))
        assert info.shape == tuple(reversed(tensor.shape.tolist()))
    assert ours.metadata["tokenizer.ggml.tokens"] == [bytes(reference.fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in reference.fields["tokenizer.ggml.tokens"].data]
    assert ours.metadata["llama.embedding_length"] == 576
    assert ours.metadata["tokenizer.ggml.model"] == "gpt2"


def test_small_file_round_trip(valid_gguf):
    contents = parse(valid_gguf, len(valid_gguf), Path("small.gguf"))
    assert contents.metadata["tokenizer.ggml.tokens"] == ["a", "b", "ab", "<s>"]
    assert contents.tensors["token_embd.weight"].shape == (4, 32)
    assert contents.tensors["token_embd.weight"].nbytes == 4 * 32 * 4


def header(tensor_count: int, kv_count: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensor_count, kv_count)


@pytest.mark.parametrize(
    "data, message",
    [
        (header(2**62, 0), "larger than the file"),
        (header(0, 2**40), "larger than the file"),
        (header(0, 1) + struct.pack("<Q", 2**60) + b"key", "string length count"),
        (header(0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**50), "array count"),
        (header(0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77), "unknown value type 77"),
        (header(0, 0, version=2**24), "unsupported GGUF version"),
        (header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQQIQ", 2, 32, 4, 999, 0), "unknown type id 999"),
        (header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQQIQ", 2, 32, 4, 0, 2**40), "beyond the end"),
        (header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9), "9 dimensions"),
        (b"\x89PNG\r\n\x1a\n", "not a GGUF file"),
    ],
)
def test_hostile_headers(data, message):
    padded = data + b"\0" * 64
    with pytest.raises(DissectError, match=message):
        parse(padded, len(padded), Path("bad.gguf"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_headers_only_raise_dissect_error(valid_gguf, data):
    blob = bytearray(valid_gguf)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, min(len(blob) - 1, 400)))
        blob[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(blob)), st.integers(0, len(blob))))
    blob = bytes(blob[:cut])
    try:
        parse(blob, len(blob), Path("fuzzed.gguf"))
    except DissectError:
        pass


@settings(max_examples=FUZZ_EXAMPLES, deadline=2000)
@given(blob=st.binary(max_size=512))
def test_random_bytes_only_raise_dissect_error(blob):
    try:
        parse(b"GGUF" + blob, len(blob) + 4, Path("random.gguf"))
    except DissectError:
        pass
