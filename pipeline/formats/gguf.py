"""GGUF files (llama.cpp): the ``token_embd.weight`` tensor, dequantized to float32.

The header is parsed by :mod:`pipeline.formats.gguf_file` (bounded and validated); the
tensor's blocks are memory-mapped and dequantized with the ``gguf`` package in row chunks,
so memory stays near one float32 copy of the matrix.

The common types (F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) are dequantized here, bit-identical to the
``gguf`` package's formulas but without its temporaries: each slab of rows is written
straight into the output, over a thread per core, and the converted source pages are
dropped from memory as the work moves on. Every other type goes through the package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import DissectError
from pipeline.formats.base import KNOWN_EMBEDDING_KEYS, Embedding, SourceRecord, choose_tensor_key, require_2d
from pipeline.formats.checks import file_inside, is_whole
from pipeline.core.memory import empty_float32, reuse_freed_memory
from pipeline.formats.convert import MappedFile, parallel_rows
from pipeline.formats.gguf_file import read_gguf
from pipeline.core.progress import progress_bar



def weight_files(path: Path) -> list[Path]:
    return [path if path.is_file() else _single_file(path)]


def read_embedding(path: Path, tensor: str | None = None) -> Embedding:
    reuse_freed_memory()
    if not path.exists():
        raise DissectError(f"{path} does not exist; set the model's `source.path` to a .gguf file")
    file = path if path.is_file() else _single_file(path)
    contents = read_gguf(file)
    _refuse_missing_split(contents, tensor)
    key = choose_tensor_key(sorted(contents.tensors), tensor, file)
    info = contents.tensors[key]
    shape = require_2d(info.shape, key, file)
    rows = 1
    for d in info.shape[:-1]:
        rows *= d
    mapped = MappedFile(contents.path, info.offset, info.nbytes)
    blocks = mapped.array("u1", (rows, info.nbytes // rows))  # [vocab, bytes per row]
    matrix = dequantize_rows(blocks, info.type_id, shape, key, release=mapped.release)
    record = SourceRecord(files=(file,), tensor_key=key, source_dtype=_type_name(info.type_id), shape=shape)
    return Embedding(matrix=matrix, source=record)


def _refuse_missing_split(contents, tensor: str | None) -> None:
    """A split GGUF names no files, and its other parts are never looked for: say so when the tensor is elsewhere."""
    parts = contents.metadata.get("split.count")
    wanted = [tensor] if tensor is not None else KNOWN_EMBEDDING_KEYS
    if is_whole(parts) and parts > 1 and not any(key in contents.tensors for key in wanted):
        raise DissectError(
            f"{contents.path} is one part of a split GGUF (split.count above 1) and does not hold the embedding; "
            "merge the parts with `llama-gguf-split --merge` and point `source.path` at the merged file"
        )


def _type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(type_id).name


def dequantize_rows(blocks: np.ndarray, type_id: int, shape: tuple[int, int], key: str, release=None) -> np.ndarray:
    """Float32 [vocab, dim] from the raw blocks [vocab, bytes per row], chunk by chunk.

    ``release(start_byte, stop_byte)``, if given, is told which source bytes are done with.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType(type_id)
    if qtype == gguf.GGMLQuantizationType.F32:
        return blocks.view(np.float32).reshape(shape)  # the memory map already is the matrix
    kernel = _KERNELS.get(qtype.name)
    out = empty_float32(shape)  # [vocab, dim]
    row_bytes = blocks.shape[1]
    with progress_bar(total=shape[0], desc=f"dequantize {key} ({qtype.name})", unit="rows") as bar:
        if kernel is None:
            work = lambda start, stop: out.__setitem__(  # noqa: E731
                slice(start, stop), _dequantize(gguf, np.asarray(blocks[start:stop]), qtype, key).reshape(stop - start, shape[1])
            )
        else:
            work = lambda start, stop: kernel(out[start:stop], blocks[start:stop])  # noqa: E731

        def done(start: int, stop: int) -> None:
            if release is not None:
                release(start * row_bytes, stop * row_bytes)
            bar.update(stop - start)

        parallel_rows(shape[0], shape[1] * 4, work, done)
    return out


def _scales(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte ``at`` of each block [n, block bytes], as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _q8_0(out: np.ndarray, raw: np.ndarray) -> None:
    blocks = raw.reshape(-1, 34)  # [n, 2 + 32]: fp16 d, int8 codes
    np.multiply(blocks[:, 2:].view(np.int8), _scales(blocks, 0), out=out.reshape(-1, 32), dtype=np.float32)


def _nibbles(out: np.ndarray, codes: np.ndarray, offset: float) -> np.ndarray:
    """[n, 32] float32 in ``out``: low nibbles of ``codes`` [n, 16] first, then the high ones, minus ``offset``."""
    blocks = out.reshape(-1, 32)
    np.subtract(codes & np.uint8(15), np.float32(offset), out=blocks[:, :16], dtype=np.float32)
    np.subtract(codes >> np.uint8(4), np.float32(offset), out=blocks[:, 16:], dtype=np.float32)
    return blocks


def _q4_0(out: np.ndarray, raw: np.ndarray) -> None:
    blocks = raw.reshape(-1, 18)  # fp16 d, 16 bytes of nibbles
    values = _nibbles(out, blocks[:, 2:], 8.0)
    np.multiply(values, _scales(blocks, 0), out=values)


def _q4_1(out: np.ndarray, raw: np.ndarray) -> None:
    blocks = raw.reshape(-1, 20)  # fp16 d, fp16 m, 16 bytes of nibbles
    values = _nibbles(out, blocks[:, 4:], 0.0)
    np.multiply(values, _scales(blocks, 0), out=values)
    np.add(values, _scales(blocks, 2), out=values)


def _f16(out: np.ndarray, raw: np.ndarray) -> None:
    np.copyto(out, raw.view(np.float16).reshape(out.shape), casting="unsafe")


def _bf16(out: np.ndarray, raw: np.ndarray) -> None:
    wide = out.view(np.uint32)
    np.copyto(wide, raw.view(np.uint16).reshape(out.shape), casting="unsafe")
    np.left_shift(wide, np.uint32(16), out=wide)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n, 8] scales, [n, 8] mins), uint8, of Q4_K's 12 bytes [n, 12] of packed 6-bit fields."""
    low, high, mixed = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & np.uint8(0x3F), (mixed & np.uint8(0x0F)) | ((low >> np.uint8(2)) & np.uint8(0x30))], axis=1)
    mins = np.concatenate([high & np.uint8(0x3F), (mixed >> np.uint8(4)) | ((high >> np.uint8(2)) & np.uint8(0x30))], axis=1)
    return scales, mins


def _q4_k(out: np.ndarray, raw: np.ndarray) -> None:
    """256 values a block: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles;
    value = (d * scale) * q - dmin * min for each 32-value sub-block, as gguf computes it."""
    blocks = raw.reshape(-1, 144)
    n = len(blocks)
    scales, mins = _k_scales(blocks[:, 4:16])
    step = (_scales(blocks, 0) * scales.astype(np.float32)).reshape(n, 4, 2, 1)  # [n, 4, 2, 1]
    low = (_scales(blocks, 2) * mins.astype(np.float32)).reshape(n, 4, 2, 1)
    values = out.reshape(n, 4, 2, 32)  # sub-block 2i: low nibbles of bytes 32i.., 2i + 1: high ones
    codes = blocks[:, 16:].reshape(n, 4, 32)
    np.multiply(codes & np.uint8(15), step[:, :, 0], out=values[:, :, 0], dtype=np.float32)
    np.multiply(codes >> np.uint8(4), step[:, :, 1], out=values[:, :, 1], dtype=np.float32)
    np.subtract(values, low, out=values)


def _q6_k(out: np.ndarray, raw: np.ndarray) -> None:
    """256 values a block: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d;
    value = (d * scale) * (q - 32) for each 16-value sub-block, as gguf computes it."""
    blocks = raw.reshape(-1, 210)
    n = len(blocks)
    low = blocks[:, :128].reshape(n, 2, 2, 32)  # [n, half, 64-byte part, byte]
    high = blocks[:, 128:192].reshape(n, 2, 32)  # [n, half, byte]
    step = (_scales(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 2, 4, 2, 1)
    values = out.reshape(n, 2, 4, 2, 16)  # [n, half, quarter, sub-block in it, value]
    for quarter in range(4):
        codes = ((low[:, :, quarter % 2] >> np.uint8(4 * (quarter // 2))) & np.uint8(15)) | (
            ((high >> np.uint8(2 * quarter)) & np.uint8(3)) << np.uint8(4)
        )  # [n, 2, 32], 0..63
        q = np.subtract(codes.view(np.int8), np.int8(32)).reshape(n, 2, 2, 16)
        np.multiply(q, step[:, :, quarter], out=values[:, :, quarter], dtype=np.float32)


_KERNELS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k, "F16": _f16, "BF16": _bf16}


def _dequantize(gguf, chunk: np.ndarray, qtype, key: str) -> np.ndarray:
    try:
        return gguf.quants.dequantize(chunk, qtype)
    except NotImplementedError:
        raise DissectError(
            f"tensor {key!r} is stored as {qtype.name}, which the gguf package cannot dequantize; convert the file to Q8_0 or F16"
        ) from None


def _single_file(folder: Path) -> Path:
    candidates = sorted(folder.glob("*.gguf"))
    if len(candidates) == 1:
        return file_inside(folder, candidates[0].name, "the GGUF file", "point `source.path` at the .gguf file itself")
    if not candidates:
        raise DissectError(f"no .gguf file in {folder}; point `source.path` at the .gguf file")
    raise DissectError(f"{folder} holds several .gguf files; point `source.path` at one of them")
