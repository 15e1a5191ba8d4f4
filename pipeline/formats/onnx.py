"""ONNX models (onnxruntime deployments): the table a ``Gather`` reads with the token ids.

Exporters name the token-embedding matrix differently (``embeddings.word_embeddings.weight``,
``model.0.auto_model.embeddings.word_embeddings.weight``, ``..._q`` with a ``..._scale``), so
it is found from the graph: the ``Gather`` whose indices are a graph input (the token ids,
possibly renamed by ``Identity``, ``Cast`` or a reshape) and whose data is an initializer,
either stored as floats or dequantized in the graph (a ``DequantizeLinear`` node, or
``Cast(codes) [- zero_point] × scale`` arithmetic). ``tensor:`` names it instead: an
initializer (float, or integer codes whose dequantization the graph holds) or a value the
graph computes from initializers that way.

The graph is loaded with ``onnx.load(..., load_external_data=False)``: tensors stored in an
external data file (``model.onnx`` + ``model.onnx.data``) are memory-mapped, only the one
tensor's byte range, after its offset and length are checked against the file. Integer
codes become float32 as the graph computes them, ``(codes - zero_point) * scale`` in
float32, per tensor, per row or per column; the provenance's ``source_dtype`` says how the
matrix was stored (``float32``, ``int8 per-row scale``, ``uint8 per-tensor scale + zero point``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.core.errors import DissectError
from pipeline.core.memory import empty_float32, reuse_freed_memory
from pipeline.core.progress import progress_bar
from pipeline.formats.base import Embedding, SourceRecord, closest_hint, require_2d, single_file
from pipeline.formats.convert import MappedFile, parallel_rows, rows_to_float32

# TensorProto.DataType numbers -> (numpy dtype of the stored bits, our name for it)
FLOAT_TYPES: dict[int, tuple[str, str]] = {1: ("<f4", "float32"), 10: ("<f2", "float16"), 16: ("<u2", "bfloat16")}
CODE_TYPES: dict[int, tuple[str, str]] = {3: ("i1", "int8"), 2: ("u1", "uint8")}
STORED_TYPES = {**FLOAT_TYPES, **CODE_TYPES}
TYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string", 9: "bool",
              10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Nodes that pass a value through unchanged (or only converted): followed back to what they read.
SAME_VALUES = frozenset({"Identity", "Cast"})
# ... and, for the token ids only, nodes that change just the shape.
SAME_IDS = SAME_VALUES | {"Reshape", "Unsqueeze", "Squeeze", "Flatten"}
# Largest scale or zero-point tensor read: one value per row of a vocabulary, with room.
MAX_SCALE_VALUES = 1 << 24

FIX = "check the file is complete and `format` is right"


def weight_files(path: Path) -> list[Path]:
    """The .onnx file and every external data file its initializers name."""
    file = path if path.is_file() else _single_file(path)
    graph = Graph.load(file)
    externals = {_external(graph.file, tensor)[0] for tensor in graph.initializers.values() if tensor.data_location == EXTERNAL}
    return [file, *sorted(externals)]


def read_embedding(path: Path, tensor: str | None = None) -> Embedding:
    reuse_freed_memory()
    if not path.exists():
        raise DissectError(f"{path} does not exist; set the model's `source.path` to an .onnx file")
    file = path if path.is_file() else _single_file(path)
    graph = Graph.load(file)
    stored = graph.named(tensor) if tensor is not None else graph.token_embedding()
    return stored.embedding(graph)


def _single_file(folder: Path) -> Path:
    return single_file(folder, ".onnx")


# --------------------------------------------------------------------------------------
# The graph


@dataclass(frozen=True)
class Stored:
    """How the graph makes a matrix from its initializers: codes [* scale, - zero point]."""

    values: Any  # TensorProto: floats, or integer codes
    scale: Any = None  # TensorProto of floats, or None
    zero_point: Any = None  # TensorProto, or None
    axis: int | None = None  # DequantizeLinear's axis; None: the scale broadcasts as in Mul

    def embedding(self, graph: Graph) -> Embedding:
        key = self.values.name
        shape = require_2d(tuple(self.values.dims), key, graph.file)
        kind = self.values.data_type
        if kind not in STORED_TYPES:
            raise DissectError(
                f"initializer {key!r} in {graph.file} is {TYPE_NAMES.get(kind, kind)}, not a type this reader supports "
                f"(float32, float16, bfloat16, or int8/uint8 codes with a scale)"
            )
        stored_dtype, dtype_name = STORED_TYPES[kind]
        raw, files = graph.values(self.values, stored_dtype, shape)
        if self.scale is None:
            matrix = rows_to_float32(raw, dtype_name, desc=f"read {key}")
            return _embedding(matrix, files, key, dtype_name, shape)
        if kind not in CODE_TYPES:
            raise DissectError(f"{key!r} in {graph.file} is dequantized in the graph but stored as {dtype_name}, not int8/uint8 codes; "
                               "set `tensor:` to the matrix the model uses")
        scale, layout = self._layout(graph, self.scale, shape, "scale")
        files += graph.files_of(self.scale)
        zero = None
        if self.zero_point is not None:
            zero, zero_layout = self._layout(graph, self.zero_point, shape, "zero point")
            files += graph.files_of(self.zero_point)
            if zero_layout != layout:
                raise DissectError(f"the zero point of {key!r} in {graph.file} is {zero_layout} but its scale {layout}; "
                                   "the file is inconsistent, re-export it")
            zero = None if not zero.any() else zero
        matrix = _dequantize(raw, scale, zero, shape, key)
        files = tuple(dict.fromkeys(files))
        label = f"{dtype_name} {layout} scale" + (" + zero point" if zero is not None else "")
        return _embedding(matrix, files, key, label, shape)

    def _layout(self, graph: Graph, tensor: Any, shape: tuple[int, int], what: str) -> tuple[np.ndarray, str]:
        """The scale or zero point as float32 [rows or 1, dim or 1], and its layout's name."""
        values = graph.small_values(tensor, what)
        dims = tuple(int(d) for d in tensor.dims)
        rows, dim = shape
        if self.axis is not None:  # DequantizeLinear: a scalar, or one value per slice along axis
            axis = self.axis + 2 if self.axis < 0 else self.axis
            if values.size == 1 and len(dims) <= 1:
                return values.reshape(1, 1), "per-tensor"
            if len(dims) == 1 and axis in (0, 1) and dims[0] == shape[axis]:
                return (values.reshape(rows, 1), "per-row") if axis == 0 else (values.reshape(1, dim), "per-column")
        else:  # Mul: numpy broadcasting against [rows, dim]
            full = (1,) * (2 - len(dims)) + dims if len(dims) <= 2 else dims
            if len(full) == 2 and full[0] in (1, rows) and full[1] in (1, dim):
                if full == (1, 1):
                    return values.reshape(1, 1), "per-tensor"
                if full == (rows, 1):
                    return values.reshape(rows, 1), "per-row"
                if full == (1, dim):
                    return values.reshape(1, dim), "per-column"
        raise DissectError(
            f"the {what} {tensor.name!r} of {self.values.name!r} in {graph.file} has shape {list(dims)}, not per tensor, per row "
            f"or per column of [{rows}, {dim}]; this reader cannot dequantize it: export the embedding as float"
        )


class Graph:
    """A loaded ModelProto's main graph: initializers, which node makes each value, the inputs."""

    def __init__(self, file: Path, model: Any):
        graph = model.graph
        self.file = file
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.nodes = list(graph.node)
        self.producers = {output: node for node in self.nodes for output in node.output if output}
        self.inputs = [value.name for value in graph.input if value.name not in self.initializers]

    @classmethod
    def load(cls, file: Path) -> Graph:
        import onnx

        try:
            model = onnx.load(str(file), format="protobuf", load_external_data=False)
        except Exception as error:  # protobuf's DecodeError and the like: the bytes are not a ModelProto
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise DissectError(f"{file} is not a valid ONNX model ({first}); {FIX}") from None
        if not model.HasField("graph"):
            raise DissectError(f"{file} holds no ONNX graph; {FIX}")
        graph = model.graph
        names = [*(t.name for t in graph.initializer), *(v.name for v in graph.input),
                 *(n for node in graph.node for n in (node.op_type, *node.input, *node.output))]
        if not all(isinstance(name, str) for name in names):  # proto2 strings that are not UTF-8 come back as bytes
            raise DissectError(f"{file} has names that are not UTF-8 text (a damaged file?); {FIX}")
        return cls(file, model)

    # ---- following values back to initializers

    def _back(self, name: str, ops: frozenset[str]) -> str:
        """``name`` followed back through nodes of ``ops`` (their first input) as far as they go."""
        for _ in range(len(self.nodes) + 1):  # a malformed graph may loop
            node = self.producers.get(name)
            if node is None or node.op_type not in ops or not node.input:
                return name
            name = node.input[0]
        return name

    def _initializer(self, name: str) -> Any:
        return self.initializers.get(self._back(name, SAME_VALUES))

    def _codes(self, name: str) -> tuple[Any, Any] | None:
        """(integer codes, zero point or None) that ``name`` is, as Cast(codes) or Cast(codes) - zero point."""
        source = self._back(name, SAME_VALUES)
        tensor = self.initializers.get(source)
        if tensor is not None:
            return (tensor, None) if tensor.data_type in CODE_TYPES else None
        node = self.producers.get(source)
        if node is not None and node.op_type == "Sub" and len(node.input) == 2:
            codes, zero = self._codes(node.input[0]), self._initializer(node.input[1])
            if codes is not None and codes[1] is None and zero is not None:
                return codes[0], zero
        return None

    def stored(self, name: str) -> Stored | None:
        """How value ``name`` is made from initializers, or None when it is computed otherwise."""
        source = self._back(name, SAME_VALUES)
        if source in self.initializers:
            return Stored(self.initializers[source])
        node = self.producers.get(source)
        if node is None:
            return None
        inputs = list(node.input)
        if node.op_type == "DequantizeLinear" and len(inputs) >= 2:
            if any(attribute.name == "block_size" and attribute.i for attribute in node.attribute):
                raise DissectError(f"{name!r} in {self.file} is block-quantized (DequantizeLinear block_size), which this reader "
                                   "cannot dequantize; export the embedding as float or per-row int8")
            codes, scale = self._initializer(inputs[0]), self._initializer(inputs[1])
            zero = self._initializer(inputs[2]) if len(inputs) > 2 and inputs[2] else None
            axis = next((int(attribute.i) for attribute in node.attribute if attribute.name == "axis"), 1)
            if codes is not None and scale is not None:
                return Stored(codes, scale, zero, axis)
        if node.op_type == "Mul" and len(inputs) == 2:
            for left, right in (inputs, inputs[::-1]):
                codes, scale = self._codes(left), self._initializer(right)
                if codes is not None and scale is not None and scale.data_type in FLOAT_TYPES:
                    return Stored(codes[0], scale, codes[1])
        return None

    # ---- finding the embedding

    def token_embedding(self) -> Stored:
        """The table of the Gather that takes a graph input as indices; the largest if several do."""
        found: dict[str, Stored] = {}
        for node in self.nodes:
            if node.op_type != "Gather" or len(node.input) != 2:
                continue
            if any(attribute.name == "axis" and attribute.i != 0 for attribute in node.attribute):
                continue
            if self._back(node.input[1], SAME_IDS) not in self.inputs:
                continue
            stored = self.stored(node.input[0])
            if stored is not None and len(stored.values.dims) == 2:
                found[stored.values.name] = stored
        if not found:
            inputs = ", ".join(repr(name) for name in self.inputs) or "none"
            raise DissectError(
                f"no Gather in {self.file} reads an initializer with the graph's inputs ({inputs}) as indices, so the token "
                f"embedding cannot be found; {closest_hint(sorted(self.initializers), 'embeddings.word_embeddings.weight')}"
            )
        rows = {name: int(stored.values.dims[0]) for name, stored in found.items()}
        largest = max(rows.values())
        tied = sorted(name for name, count in rows.items() if count == largest)
        if len(tied) > 1:
            names = ", ".join(repr(name) for name in tied)
            raise DissectError(f"several tables of {largest} rows are looked up with the inputs of {self.file} ({names}); "
                               "set `tensor:` in the model's config to the token embedding")
        return found[tied[0]]

    def named(self, name: str) -> Stored:
        """The matrix ``tensor:`` names: a value the graph makes from initializers, or an initializer.

        Integer codes named directly are dequantized the way the graph does it, when it does.
        """
        if name in self.initializers and self.initializers[name].data_type in CODE_TYPES:
            for node in self.nodes:
                if node.op_type in ("DequantizeLinear", "Mul"):
                    stored = self.stored(node.output[0]) if node.output else None
                    if stored is not None and stored.values.name == name and stored.scale is not None:
                        return stored
        stored = self.stored(name) if name in self.initializers or name in self.producers else None
        if stored is not None:
            return stored
        if name in self.producers:
            raise DissectError(f"{name!r} in {self.file} is computed by a {self.producers[name].op_type} node, not stored; "
                               "set `tensor:` to an initializer")
        raise DissectError(f"tensor {name!r} is not in {self.file}; {closest_hint(sorted(self.initializers), name)}")

    # ---- reading tensor bytes

    def values(self, tensor: Any, dtype: str, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[Path, ...]]:
        """The tensor's stored values [shape] and the files read; external data memory-mapped."""
        itemsize = np.dtype(dtype).itemsize
        nbytes = math.prod(shape) * itemsize
        if tensor.data_location == EXTERNAL:
            data_file, offset, length = _external(self.file, tensor, nbytes)
            if dtype == "<f4":
                return np.memmap(data_file, dtype=dtype, mode="r", offset=offset, shape=shape), (self.file, data_file)
            return MappedFile(data_file, offset, length).array(dtype, shape), (self.file, data_file)
        if tensor.raw_data:
            raw = tensor.raw_data
            if len(raw) != nbytes:
                raise DissectError(f"initializer {tensor.name!r} in {self.file} holds {len(raw)} bytes, not the {nbytes} of its "
                                   f"shape {list(shape)}; {FIX}")
            return np.frombuffer(raw, dtype=dtype).reshape(shape), (self.file,)
        return self._typed_values(tensor, dtype, shape), (self.file,)

    def _typed_values(self, tensor: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        """Values kept in the typed fields (float_data, int32_data) rather than raw bytes."""
        if tensor.data_type == 1:
            field = tensor.float_data
        elif tensor.data_type in (2, 3, 10, 16):  # 8-bit codes, and 16-bit floats as their bits
            field = tensor.int32_data
        else:
            field = ()
        count = math.prod(shape)
        if len(field) != count:
            raise DissectError(f"initializer {tensor.name!r} in {self.file} holds {len(field)} values, not the {count} of its "
                               f"shape {list(shape)}; {FIX}")
        if tensor.data_type == 1:
            return np.asarray(field, np.float32).reshape(shape)
        return np.asarray(field, np.int64).astype(dtype).reshape(shape)

    def files_of(self, tensor: Any) -> tuple[Path, ...]:
        """The file holding a tensor's bytes: the model's own, or its external data file."""
        return (_external(self.file, tensor)[0],) if tensor.data_location == EXTERNAL else (self.file,)

    def small_values(self, tensor: Any, what: str) -> np.ndarray:
        """A scale or zero point as float32 (flat)."""
        dims = tuple(int(d) for d in tensor.dims)
        if any(d < 0 for d in dims) or math.prod(dims) > MAX_SCALE_VALUES:
            raise DissectError(f"the {what} {tensor.name!r} in {self.file} has shape {list(dims)}; {FIX}")
        kind = tensor.data_type
        if kind not in STORED_TYPES:
            raise DissectError(f"the {what} {tensor.name!r} in {self.file} is {TYPE_NAMES.get(kind, kind)}, "
                               "not a float or 8-bit integer type; this reader cannot dequantize it")
        dtype, name = STORED_TYPES[kind]
        values, _ = self.values(tensor, dtype, dims)
        values = np.asarray(values).reshape(-1)
        return (values.astype(np.uint32) << 16).view(np.float32) if name == "bfloat16" else values.astype(np.float32)


def _external(model_file: Path, tensor: Any, nbytes: int | None = None) -> tuple[Path, int, int]:
    """(data file, offset, length) of a tensor stored outside the model, checked against the file."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not isinstance(location, str) or "\0" in location:
        raise DissectError(f"initializer {tensor.name!r} of {model_file} names external data that is not a file name; {FIX}")
    parts = PurePosixPath(location.replace("\\", "/")).parts
    if not location or PurePosixPath(location).is_absolute() or ".." in parts:
        raise DissectError(f"initializer {tensor.name!r} of {model_file} names external data {location!r}, not a file beside "
                           "the model; re-export it with its data file in the model's folder")
    data_file = model_file.parent.joinpath(*parts)
    if not data_file.is_file():
        raise DissectError(f"{data_file} is missing, and {model_file} keeps {tensor.name!r} in it; put the model's external "
                           "data file beside the .onnx file")
    size = data_file.stat().st_size
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else (size - offset if nbytes is None else nbytes)
    except ValueError:
        raise DissectError(f"initializer {tensor.name!r} of {model_file} has a malformed external offset or length; {FIX}") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise DissectError(f"initializer {tensor.name!r} of {model_file} lies outside {data_file.name} (bytes {offset}..{offset + length}"
                           f" of {size}); {FIX}")
    if nbytes is not None and length != nbytes:
        raise DissectError(f"initializer {tensor.name!r} of {model_file} has {length} bytes in {data_file.name}, not the {nbytes} "
                           f"of its shape {list(tensor.dims)}; {FIX}")
    return data_file, offset, length


def _dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, shape: tuple[int, int], key: str) -> np.ndarray:
    """float32 ``(codes - zero) * scale`` [rows, dim], as the graph computes it, in row slabs."""
    out = empty_float32(shape)  # [rows, dim]
    per_row = scale.shape[0] > 1

    def work(start: int, stop: int) -> None:
        block = out[start:stop]
        rows = slice(start, stop) if per_row else slice(None)
        np.copyto(block, codes[start:stop], casting="unsafe")
        if zero is not None:
            np.subtract(block, zero[rows], out=block)
        np.multiply(block, scale[rows], out=block)

    with progress_bar(total=shape[0], desc=f"dequantize {key}", unit="rows") as bar:
        parallel_rows(shape[0], shape[1] * 4, work, lambda start, stop: bar.update(stop - start))
    return out


def _embedding(matrix: np.ndarray, files: tuple[Path, ...], key: str, dtype: str, shape: tuple[int, int]) -> Embedding:
    return Embedding(matrix=matrix, source=SourceRecord(files=files, tensor_key=key, source_dtype=dtype, shape=shape))
