"""Weight files built to hurt: paths out of the model folder, zip bombs, headers that lie.

Each ends in one DissectError line, reads nothing outside the model's folder and costs
bounded memory (measured in a subprocess). Every builder here writes a few kilobytes or
megabytes: the bombs are deflate streams of zeros, never the gigabytes they inflate to.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy

from pipeline.core.errors import DissectError
from pipeline.formats import read_embedding, weight_files
from pipeline.formats.checks import MAX_JSON_DEPTH, JSONProblem, parse_json
from pipeline.formats.gguf_file import parse
from pipeline.tokenizers.load import detect_tokenizer, tokenizer_from_json

SMALL = np.arange(12, dtype=np.float32).reshape(4, 3)  # [vocab=4, dim=3]
SECRET = b"secret bytes outside the model folder"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A valid safetensors file and a secret, both outside the model folder ``tmp_path/model``."""
    save_numpy({"model.embed_tokens.weight": SMALL}, tmp_path / "elsewhere.safetensors")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "model").mkdir()
    return tmp_path


def sharded_folder(folder: Path, shard_name: str) -> Path:
    save_numpy({"model.embed_tokens.weight": SMALL}, folder / "model-00001-of-00001.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00001.safetensors", "model.norm.weight": shard_name}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def refused_everywhere(fmt: str, folder: Path, match: str) -> None:
    """Neither reading nor listing (what fetch hashes) accepts ``folder``, and no message shows a secret."""
    for action in (lambda: read_embedding(fmt, folder), lambda: weight_files(fmt, folder)):
        with pytest.raises(DissectError, match=match) as caught:
            action()
        assert SECRET.decode() not in str(caught.value) and "\n" not in str(caught.value)


# ---- 1. paths named by a model file stay inside the model folder -----------------------------


@pytest.mark.parametrize(
    "shard_name, match",
    [
        ("../../../../../../etc/passwd", "lies outside"),
        ("/etc/passwd", "lies outside"),
        ("../secret.txt", "lies outside"),
        ("../elsewhere.safetensors", "lies outside"),
        ("missing-00002.safetensors", "is missing from"),
        (".", "is not a file in"),
        ("", "empty name"),
        ("bad\0name", "not a usable file name"),
    ],
)
def test_index_naming_a_file_outside_or_missing_is_refused(outside, shard_name, match):
    refused_everywhere("safetensors", sharded_folder(outside / "model", shard_name), match)


def test_index_pointing_at_a_valid_file_outside_is_refused_even_for_the_embedding(outside):
    folder = outside / "model"
    weight_map = {"model.embed_tokens.weight": "../elsewhere.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused_everywhere("safetensors", folder, "lies outside")


def test_links_out_of_the_folder_are_refused_for_every_format(outside):
    folder = outside / "model"
    (folder / "model.safetensors").symlink_to(outside / "elsewhere.safetensors")
    refused_everywhere("safetensors", folder, "lies outside")
    (folder / "model.safetensors").unlink()
    sharded_folder(folder, "link.safetensors")
    (folder / "link.safetensors").symlink_to(outside / "secret.txt")
    refused_everywhere("safetensors", folder, "lies outside")

    meta = outside / "meta"
    meta.mkdir()
    torch.save({"tok_embeddings.weight": torch.from_numpy(SMALL)}, outside / "shard.pth")
    (meta / "consolidated.00.pth").symlink_to(outside / "shard.pth")
    refused_everywhere("meta", meta, "lies outside")
    (meta / "consolidated.00.pth").unlink()
    torch.save({"tok_embeddings.weight": torch.from_numpy(SMALL)}, meta / "consolidated.00.pth")
    (meta / "params.json").symlink_to(outside / "secret.txt")
    refused_everywhere("meta", meta, "lies outside")

    ggufs = outside / "gguf"
    ggufs.mkdir()
    (ggufs / "model.gguf").symlink_to(outside / "secret.txt")
    refused_everywhere("gguf", ggufs, "lies outside")


def test_tokenizer_linked_out_of_the_folder_is_refused(outside):
    folder = outside / "model"
    (folder / "tokenizer.json").symlink_to(outside / "secret.txt")
    with pytest.raises(DissectError, match="lies outside"):
        detect_tokenizer(folder)


def test_links_inside_the_folder_are_followed(tmp_path):
    save_numpy({"model.embed_tokens.weight": SMALL}, tmp_path / "real.safetensors")
    (tmp_path / "model.safetensors").symlink_to("real.safetensors")
    assert np.array_equal(read_embedding("safetensors", tmp_path).matrix, SMALL)


def test_fetch_never_hashes_a_file_an_index_names_outside(outside, monkeypatch):
    from pipeline.core.params import model_config
    from pipeline.stages import fetch

    hashed = []
    monkeypatch.setattr(fetch, "file_sha256", lambda path: hashed.append(path) or "0" * 64)
    folder = sharded_folder(outside / "model", "../secret.txt")
    with pytest.raises(DissectError, match="lies outside"):
        fetch.build_manifest(model_config({"models": {"m": {"format": "safetensors", "source": {"path": str(folder)}}}}, "m"),
                             folder, {"kind": "tokenizer.json", "path": str(folder / "tokenizer.json")})
    assert hashed == []


def test_split_gguf_without_the_embedding_names_the_fix(tmp_path):
    path = tmp_path / "model-00002-of-00003.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint16("split.no", 1)
    writer.add_uint16("split.count", 3)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(DissectError, match="one part of a split GGUF.*llama-gguf-split --merge"):
        read_embedding("gguf", path)


def test_a_header_length_that_is_not_plausible_never_shows_the_files_bytes(tmp_path):
    path = tmp_path / "passwd.safetensors"
    path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(DissectError, match="header length is not plausible") as caught:
        read_embedding("safetensors", path)
    (number,) = struct.unpack("<Q", b"root:x:0")
    assert str(number) not in str(caught.value) and f"{number:,}" not in str(caught.value)


def test_gguf_counts_that_are_not_plausible_are_not_shown():
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + b"root:x:0:0:root:/root" + b"\0" * 64
    with pytest.raises(DissectError, match="string length count is larger than the file") as caught:
        parse(data, len(data), Path("x.gguf"))
    assert str(struct.unpack("<Q", b"root:x:0")[0]) not in str(caught.value)


# ---- 3. size and decompression bombs in Meta checkpoints -----------------------------------


def deflated_zeros(total: int, chunk: int = 1 << 20) -> bytes:
    """A raw deflate stream of ``total`` zero bytes: one flushed megabyte block, repeated (~1 KB each)."""
    block_compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = block_compressor.compress(bytes(chunk)) + block_compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (total // chunk) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def write_bomb(path: Path, inflated: int, declared: int | None = None) -> Path:
    """A checkpoint whose data.pkl inflates to ``inflated`` zero bytes and says it is ``declared`` long."""
    declared = inflated if declared is None else declared
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("archive/data.pkl")
        with archive.open(info, "w", force_zip64=True) as member:  # the stream, written as is
            member.write(deflated_zeros(inflated))
        info.compress_type, info.file_size, info.CRC = zipfile.ZIP_DEFLATED, declared, 0
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", bytes(48))
        archive.writestr("archive/version", "3\n")
    with open(path, "r+b") as handle:  # the local header says the same as the central directory
        handle.seek(info.header_offset + 8)
        handle.write(struct.pack("<H", zipfile.ZIP_DEFLATED))
        handle.seek(info.header_offset + 30 + len(info.filename) + 4)  # the zip64 extra: sizes
        handle.write(struct.pack("<Q", declared))
    return path


MEASURE = """
import resource, sys
from pathlib import Path
import numpy, torch  # loaded before the baseline: only the read is measured
from pipeline.core.errors import DissectError
from pipeline.formats import read_embedding
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_embedding("meta", Path(sys.argv[1]))
    outcome = "read"
except DissectError as error:
    outcome = str(error)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
print(outcome)
"""
MEMORY_BOUND_KB = 256 * 1024


def peak_growth_kb(folder: Path) -> tuple[int, str]:
    """Peak RSS growth (KiB) of reading ``folder`` in a fresh interpreter, and what it said."""
    result = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}, check=True)
    growth, outcome = result.stdout.splitlines()[:2]
    return int(growth), outcome


@pytest.mark.parametrize(
    "inflated, declared, match",
    [
        (1 << 30, None, "data.pkl is larger than the 512 KiB"),  # 1 MB file, 1 GiB pickle
        (10 << 30, None, "data.pkl is larger than the 512 KiB"),  # 10 MB file, 10 GiB pickle (zip64)
        (1 << 30, 100_000, "PyTorch checkpoint|refused"),  # says 100 kB, inflates to 1 GiB
        (10 << 30, 500_000, "PyTorch checkpoint|refused"),
    ],
    ids=["1GiB", "10GiB", "1GiB-lying", "10GiB-lying"],
)
def test_zip_bombs_are_refused_within_the_memory_bound(tmp_path, inflated, declared, match):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    bomb = write_bomb(folder / "consolidated.00.pth", inflated, declared)
    assert bomb.stat().st_size < inflated // 500
    growth, outcome = peak_growth_kb(folder)
    assert re.search(match, outcome), outcome
    assert growth < MEMORY_BOUND_KB, f"reading the bomb grew the peak RSS by {growth} KiB"


def test_the_largest_pickle_allowed_stays_within_the_memory_bound(tmp_path):
    """512 KiB of EMPTY_SET opcodes, the costliest pickle per byte, through both unpicklers."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with zipfile.ZipFile(folder / "consolidated.00.pth", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + b"\x8f" * (512 * 1024 - 4) + b"N.")
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    growth, outcome = peak_growth_kb(folder)
    assert "not a state dict" in outcome
    assert growth < MEMORY_BOUND_KB


@pytest.mark.parametrize(
    "member, size, compress, match",
    [
        ("archive/data/0", 48, zipfile.ZIP_DEFLATED, "storage 'archive/data/0' is compressed"),
        ("archive/extra", 17 << 20, zipfile.ZIP_DEFLATED, "would inflate past 16 MiB"),
    ],
)
def test_every_member_is_checked_before_inflating(tmp_path, member, size, compress, match):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"tok_embeddings.weight": torch.from_numpy(SMALL)}, folder / "consolidated.00.pth")
    with zipfile.ZipFile(folder / "consolidated.00.pth", "a") as archive:
        archive.writestr(zipfile.ZipInfo(member), bytes(size), compress_type=compress)
    with pytest.raises(DissectError, match=match):
        read_embedding("meta", folder)


def test_duplicate_and_overlong_members_are_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shard = folder / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": torch.from_numpy(SMALL)}, shard)
    with pytest.warns(UserWarning), zipfile.ZipFile(shard, "a") as archive:
        archive.writestr(archive.infolist()[0].filename, b"again")
    with pytest.raises(DissectError, match="two members share a name"):
        read_embedding("meta", folder)


# ---- 4. headers that lie -------------------------------------------------------------------


def raw_safetensors(path: Path, header: bytes | dict, data: bytes = b"") -> Path:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def entry(dtype="F32", shape=(4, 3), offsets=(0, 48)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "tensor, match",
    [
        (entry(shape=(2**32, 2**32), offsets=(0, 0)), "does not match"),  # 2**64 elements: int64 wraps to 0
        (entry(shape=(2**62, 4)), "does not match"),
        (entry(shape=(2**40, 2**40), offsets=(0, 48)), "does not match"),
        (entry(shape=(True, 3)), "invalid shape"),
        (entry(shape=(4.0, 3)), "invalid shape"),
        (entry(offsets=(False, 48)), "invalid data_offsets"),
        (entry(offsets=(0, 48.0)), "invalid data_offsets"),
        (entry(offsets=(0, 2**70)), "lies outside the file"),
    ],
)
def test_safetensors_shapes_and_offsets_that_lie(tmp_path, tensor, match):
    path = raw_safetensors(tmp_path / "m.safetensors", {"model.embed_tokens.weight": tensor}, SMALL.tobytes())
    with pytest.raises(DissectError, match=match):
        read_embedding("safetensors", path)


def test_safetensors_duplicate_keys_are_refused_not_last_one_wins(tmp_path):
    first = json.dumps(entry("F32"))
    header = f'{{"model.embed_tokens.weight": {first}, "model.embed_tokens.weight": {json.dumps(entry("BF16", (4, 6)))}}}'
    path = raw_safetensors(tmp_path / "m.safetensors", header.encode(), SMALL.tobytes())
    with pytest.raises(DissectError, match="the key 'model.embed_tokens.weight' appears twice"):
        read_embedding("safetensors", path)


@pytest.mark.parametrize("opener, closer", [(b"[", b"]"), (b'{"a":', b"}"), (b"[", b"}")])
def test_json_nested_100000_deep_is_refused_in_every_json_file(tmp_path, opener, closer):
    deep = b'{"x":' + opener * 100_000 + b"0" + closer * 100_000 + b"}"
    path = raw_safetensors(tmp_path / "m.safetensors", deep)
    with pytest.raises(DissectError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        read_embedding("safetensors", path)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_bytes(deep)
    with pytest.raises(DissectError, match="nested deeper"):
        read_embedding("safetensors", sharded)

    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save({"tok_embeddings.weight": torch.from_numpy(SMALL)}, meta / "consolidated.00.pth")
    (meta / "params.json").write_bytes(deep)
    with pytest.raises(DissectError, match="nested deeper"):
        read_embedding("meta", meta)

    (tmp_path / "tokenizer.json").write_bytes(deep)
    with pytest.raises(DissectError, match="nested deeper"):
        tokenizer_from_json(tmp_path / "tokenizer.json")


def test_json_depth_counts_brackets_only_outside_strings():
    assert parse_json(json.dumps({"name": "[" * 1000, "x": [[1]]}).encode())["x"] == [[1]]
    assert parse_json(json.dumps({"a": '\\"[[[' * 100}).encode())
    with pytest.raises(JSONProblem, match="nested deeper"):
        parse_json(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert parse_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)


def test_safetensors_header_over_the_limit_names_the_limit(tmp_path, monkeypatch):
    from pipeline.formats import safetensors as reader

    path = tmp_path / "padded.safetensors"
    with open(path, "wb") as handle:  # sparse: the header length says 100 MB + 1, the file is that long
        handle.write(struct.pack("<Q", reader.MAX_HEADER_BYTES + 1))
        handle.truncate(8 + reader.MAX_HEADER_BYTES + 1 + 64)
    with pytest.raises(DissectError, match="over the format's limit of 100,000,000 bytes"):
        read_embedding("safetensors", path)
    monkeypatch.setattr(reader, "MAX_HEADER_BYTES", 4096)  # padded to exactly the limit: read
    body = json.dumps({"model.embed_tokens.weight": entry()}).encode()
    raw_safetensors(path, body + b" " * (4096 - len(body)), SMALL.tobytes())
    assert np.array_equal(read_embedding("safetensors", path).matrix, SMALL)


def gguf_bytes(tmp_path: Path, tensors: list[str], extra_kv: bytes = b"", extra_kv_count: int = 0, offset_shift: int = 0,
               alignment: bytes = struct.pack("<II", 4, 32)) -> bytes:
    """A hand-laid GGUF v3: ``tensors`` each F32 [4, 32] (aligned at 32 unless shifted), and extra metadata."""
    kv = struct.pack("<Q", 17) + b"general.alignment" + alignment + extra_kv
    infos = b""
    for index, name in enumerate(tensors):
        infos += struct.pack("<Q", len(name)) + name.encode() + struct.pack("<IQQIQ", 2, 32, 4, 0, index * 512 + offset_shift)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1 + extra_kv_count) + kv + infos
    head += b"\0" * (-len(head) % 32)
    return head + np.zeros((len(tensors) * 4 + 1, 32), np.float32).tobytes()


def parse_bytes(data: bytes):
    return parse(data, len(data), Path("x.gguf"))


def test_gguf_duplicates_and_misaligned_offsets(tmp_path):
    assert set(parse_bytes(gguf_bytes(tmp_path, ["token_embd.weight", "output.weight"])).tensors) == {"token_embd.weight", "output.weight"}
    with pytest.raises(DissectError, match="tensor 'token_embd.weight' appears twice"):
        parse_bytes(gguf_bytes(tmp_path, ["token_embd.weight", "token_embd.weight"]))
    again = struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 64)
    with pytest.raises(DissectError, match="metadata key 'general.alignment' appears twice"):
        parse_bytes(gguf_bytes(tmp_path, ["token_embd.weight"], again, 1))
    with pytest.raises(DissectError, match="not a multiple of general.alignment 32"):
        parse_bytes(gguf_bytes(tmp_path, ["token_embd.weight"], offset_shift=4))


def test_gguf_boolean_alignment_and_token_ids_are_refused(tmp_path):
    with pytest.raises(DissectError, match="general.alignment True is not a power of two"):
        parse_bytes(gguf_bytes(tmp_path, ["token_embd.weight"], alignment=struct.pack("<IB", 7, 1)))  # bool
    from pipeline.tokenizers.load import _gguf_token_id

    for value in (True, 1.0, "1"):
        with pytest.raises(DissectError, match="not a whole number"):
            _gguf_token_id({"tokenizer.ggml.bos_token_id": value}, "tokenizer.ggml.bos_token_id", ["a", "b"], Path("x.gguf"))


def write_meta(folder: Path, pieces: list[torch.Tensor], params: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, piece in enumerate(pieces):
        torch.save({"tok_embeddings.weight": piece.clone()}, folder / f"consolidated.{index:02d}.pth")
    if params is not None:
        (folder / "params.json").write_text(json.dumps(params))
    return folder


def test_meta_params_dim_must_agree_with_a_single_shard(tmp_path):
    tensor = torch.from_numpy(SMALL)
    with pytest.raises(DissectError, match=r"is \[4, 3\] but params.json says dim 6"):
        read_embedding("meta", write_meta(tmp_path / "a", [tensor], {"dim": 6}))
    for dim in (True, 3.0, "3", -3, 0):
        with pytest.raises(DissectError, match="not a positive whole number"):
            read_embedding("meta", write_meta(tmp_path / f"b{dim}", [tensor], {"dim": dim}))
    with pytest.raises(DissectError, match="the key 'dim' appears twice"):
        folder = write_meta(tmp_path / "c", [tensor], None)
        (folder / "params.json").write_text('{"dim": 3, "dim": 6}')
        read_embedding("meta", folder)


def test_meta_shards_of_unequal_size_are_refused_not_joined(tmp_path):
    tensor = torch.from_numpy(np.arange(24, dtype=np.float32).reshape(6, 4))
    with pytest.raises(DissectError, match="unequal shapes"):
        read_embedding("meta", write_meta(tmp_path / "vocab", [tensor[:4], tensor[4:]], {"dim": 4}))
    with pytest.raises(DissectError, match="unequal shapes"):
        read_embedding("meta", write_meta(tmp_path / "dim", [tensor[:, :1], tensor[:, 1:]], {"dim": 4}))
    joined = read_embedding("meta", write_meta(tmp_path / "equal", [tensor[:3], tensor[3:]], {"dim": 4}))
    assert np.array_equal(joined.matrix, tensor.numpy())
