"""quantize stage: each scheme of ``quantize.schemes`` as its own Parquet, and what it loses.

For model ``<name>`` it reads ``artifacts/<name>/embeddings.parquet`` (and ``words.parquet``,
whose words it measures) and writes:

* ``artifacts/<name>/quant/<scheme>.parquet``: the quantized codes (and scales) in the
  layout of :mod:`pipeline.quant.layout`, whose docstring shows how to rebuild the floats
  with pyarrow and numpy alone;
* ``artifacts/<name>/quant.json`` (DVC metrics), per scheme: ``bits_per_weight`` (scales
  counted), ``bytes_on_disk``, ``compression_vs_float32`` and ``compression_vs_source``
  (ratios of bits per weight), ``rmse``, ``max_abs_error``, ``snr_db`` (null when nothing
  was lost), ``row_cosine_mean`` / ``row_cosine_min`` (each row against its dequantized
  self), ``clipped_values`` / ``clipped_fraction`` (values outside the range the codes
  span), ``words_recall_at_k`` / ``tokens_recall_at_k`` (overlap of the exact top-k
  neighbours by cosine over the whole vocabulary, original vs dequantized matrix, for the
  configured words and for a seeded sample of tokens, self excluded) and
  ``words_similarity_max_change`` (largest change in the words' cosine table).

Each scheme streams the matrix in row chunks: encode, write, decode, measure, so memory stays
near one float32 copy of the matrix. Each core encodes, decodes and measures the error of its
span of a chunk, a cache's worth of rows at a time (the scheme kernels and the error pass of
:mod:`pipeline.quant.kernels`); the codes are written by a second thread (as raw bytes, see
:mod:`pipeline.quant.layout`), which may finish a scheme's file while the next scheme is
encoded, and a chunk's neighbours are searched while the next chunk is encoded, by the
engine's bfloat16 screen (:class:`pipeline.core.knn.TopK`, started from the original's
neighbours), whose result is exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.memory import return_freed_memory
from pipeline.core.io import output_set, write_json_atomic, written_path
from pipeline.core.knn import MAX_K, TopK, best_of_pairs, excluding_own, unit_rows
from pipeline.core.params import model_paths
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import as_params, from_section, list_of, one_of, setting, whole_number
from pipeline.lookup import POOLINGS
from pipeline.core.parquet import (
    derived_provenance,
    read_matrix,
    read_provenance,
    start_writing,
    with_provenance,
)
from pipeline.core.progress import progress_bar
from pipeline.quant import SCHEMES, Encoded, Scheme, schemes_for
from pipeline.core.parallel import chunk_map, in_order, row_chunks, span_map, start_in_background
from pipeline.quant.layout import ROWS_PER_CHUNK, quant_schema, quant_write_options, record_batch
from pipeline.quant.recall import SCORE_SLACK, Queries, Reference, WordQuery, reference, sample_token_rows
from pipeline.quant.measure import (
    ErrorStats,
    OriginalSums,
    inverse_of_norms,
    original_sums,
    recall,
    RowErrors,
    similarity_table,
)

@dataclass(frozen=True)
class QuantizeSettings:
    schemes: list[str] = setting(list(SCHEMES), list_of(one_of(*SCHEMES), min_items=1, unique=True))
    # Seeded sample of tokens whose nearest neighbours measure recall@k after quantization.
    sample_tokens: int = setting(1000, whole_number(0, 1_000_000))
    recall_k: int = setting(10, whole_number(1, MAX_K))
    seed: int = setting(0, whole_number(0, 2**32 - 1))


def word_queries(paths: ModelPaths, vocab: int) -> tuple[list[WordQuery], str]:
    """The words stage's variants (text looked up, token ids) and how it pooled them."""
    try:
        table = pq.read_table(paths.words, columns=["variant", "token_ids", "pooling"])
    except FileNotFoundError:
        raise DissectError(f"{paths.words} does not exist; run the words stage first (`dvc repro words@{paths.name}`)") from None
    except (KeyError, pa.ArrowInvalid) as error:
        raise DissectError(f"{paths.words} is not a words table ({error}); rebuild it with `dvc repro words@{paths.name}`") from None
    queries = []
    for text, ids in zip(table.column("variant").to_pylist(), table.column("token_ids").to_pylist()):
        if not ids:
            raise DissectError(f"the word {text!r} has no tokens in {paths.words}; remove it from words.list")
        if max(ids) >= vocab or min(ids) < 0:
            raise DissectError(f"{paths.words} names token ids outside the {vocab} rows of the matrix; rebuild it with the words stage")
        queries.append(WordQuery(text, tuple(ids)))
    poolings = set(table.column("pooling").to_pylist()) or {"mean"}
    if len(poolings) != 1 or not poolings <= set(POOLINGS):
        raise DissectError(f"{paths.words} mixes or misnames poolings {sorted(map(str, poolings))}; rebuild it with the words stage")
    return queries, poolings.pop()


# Rows a core encodes, decodes and measures at a time: about 0.5 MiB of float32 (64 rows at
# dim 2048), so the decoded rows are measured while they and their originals are still in the
# core's cache, and a chunk's rows are read from memory once and its decoded rows written once
# (a fifth off those passes on the 1B). Every scheme encodes a row on its own (a tensor
# scale is fitted beforehand), so the split changes no bit.
BYTES_IN_CACHE = 1 << 19


def encode_rows(scheme: Scheme, rows: np.ndarray) -> Encoded:
    """``scheme.encode(rows)``, spread over the cores."""
    return _encode_spans(scheme, rows, decode_into=None)


def encode_decode(scheme: Scheme, rows: np.ndarray) -> tuple[Encoded, np.ndarray]:
    """(``scheme.encode(rows)``, its decoded float32 rows [n, dim]), spread over the cores."""
    restored = np.empty(rows.shape, dtype=np.float32)  # [n, dim]
    return _encode_spans(scheme, rows, decode_into=restored), restored


def encode_decode_measure(scheme: Scheme, rows: np.ndarray) -> tuple[Encoded, np.ndarray, RowErrors]:
    """:func:`encode_decode` and the :class:`RowErrors` of the decoded rows, each span measured
    by its core right after decoding it, while its rows are still in cache."""
    restored = np.empty(rows.shape, dtype=np.float32)  # [n, dim]
    errors = RowErrors.empty(*rows.shape)
    return _encode_spans(scheme, rows, decode_into=restored, errors=errors), restored, errors


def _encode_spans(scheme: Scheme, rows: np.ndarray, decode_into: np.ndarray | None, errors: RowErrors | None = None) -> Encoded:
    """Each core encodes its span of ``rows`` [n, dim] into the one codes (and scales) array and,
    given ``decode_into``, decodes it there (and measures it into ``errors``), so no part is
    copied again on this thread."""
    n, dim = rows.shape
    codes = np.empty((n, scheme.code_width(dim)), dtype=scheme.codes_dtype)  # [n, code_width]
    block = scheme.block_for(dim) if scheme.tensor_scale is None else None
    scales = np.empty((n, dim // block), dtype=np.float32) if block else None  # [n, blocks]
    # Rows at a time, see BYTES_IN_CACHE; encoding alone reads each value once anyway.
    step = max(1, BYTES_IN_CACHE // (4 * max(dim, 1))) if decode_into is not None else max(n, 1)

    def encode(span: tuple[int, int]) -> int:
        clipped = 0
        for start in range(span[0], span[1], step):
            stop = min(start + step, span[1])
            part = scheme.encode(rows[start:stop])
            codes[start:stop] = part.codes
            if scales is not None:
                scales[start:stop] = part.scales
            if decode_into is not None:
                scheme.decode(part, out=decode_into[start:stop])
                if errors is not None:
                    errors.fill(rows, decode_into, (start, stop))
            clipped += part.clipped
        return clipped

    return Encoded(codes=codes, scales=scales, clipped=sum(span_map(encode, n)))


@dataclass
class SchemeRun:
    """One scheme over the whole matrix: codes to Parquet, error and neighbours measured on the way.

    The neighbours of the dequantized matrix are exact, found one of two ways:

    * in full: every chunk's dequantized rows against every query, through the engine's
      bfloat16 screen (:class:`pipeline.core.knn.TopK`; exact: the rows it cannot rule out
      are rescored in float64);
    * pruned, when ``ref`` carries candidates: a query's cosine with a row moves by at most
      ``delta_q + eps_j`` (the distances between the original and dequantized unit vectors of
      the query and of the row), so a row can enter the dequantized top-k only if its original
      cosine is within ``2 (delta_q + eps_max)`` of the original k-th best. When each query's
      candidate list reaches below that window, the top-k is found among those rows alone;
      otherwise (a coarse scheme) the full search runs. The sampled token queries are
      themselves rows, so their deltas predict the window before the pass starts; a chunk
      whose rows moved farther than that switches the pass to the full search from there
      on, and only the rows before it are decoded again for it afterwards.
    """

    scheme: Scheme
    matrix: np.ndarray
    queries: Queries
    k: int
    ref: Reference | None = None
    sums: list[OriginalSums] | None = None  # per chunk of ROWS_PER_CHUNK rows, shared by the schemes

    def __post_init__(self) -> None:
        self.errors = ErrorStats()
        tokens, self.words = self.queries.vectors(self.restore)
        self.units = unit_rows(np.concatenate([tokens, self.words]))
        self.top = TopK(self.units, self.k, excluding_own(self.queries.self_rows), screen="bfloat16")
        self.neighbours: np.ndarray | None = None  # [q, k] row ids, after the pass
        self.max_row_shift = 0.0  # eps_max: largest distance between a row's unit vectors
        self.pruned = False
        self.screen_before = 0  # rows the pruned pass measured before it gave way to the full search
        self.query_shift = None
        if self.ref is not None and self.ref.candidate_ids is not None:
            shift = self.units.astype(np.float64) - self.ref.query_units
            self.query_shift = np.sqrt(np.einsum("ij,ij->i", shift, shift))  # [q] delta_q
            predicted = float(self.query_shift.max()) if len(self.query_shift) else 0.0
            self.pruned = self._window_covered(predicted)

    def restore(self, rows: np.ndarray) -> np.ndarray:
        """The dequantized rows at indices ``rows``."""
        if not len(rows):
            return np.empty((0, self.matrix.shape[1]), dtype=np.float32)
        return encode_decode(self.scheme, self.matrix[rows])[1]

    def _seed_full_search(self) -> None:
        """Start the full search from the original's neighbours, scored on the dequantized
        matrix: most of them stay among the k best, so from the first chunk on the screen
        passes only the rows that may still beat them (the answer is the same)."""
        if self.ref is None:
            return
        query, slot = np.nonzero(self.ref.neighbours >= 0)
        self.top.seed(query, self.ref.neighbours[query, slot], self.restore)

    def _windows(self, max_row_shift: float) -> np.ndarray:
        return 2 * (self.query_shift + max_row_shift) + SCORE_SLACK  # [q]

    def _window_covered(self, max_row_shift: float) -> bool:
        """Every query's candidate list reaches below its k-th best original cosine minus its window:
        no row left out of the list can reach the window."""
        if not np.isfinite(max_row_shift) or not len(self.units):
            return False
        lowest = self.ref.candidate_scores.min(axis=1)  # [q]; -inf when the list holds every row
        left_out = self.ref.reach(lowest, self.ref.candidate_slack)  # [q]
        return bool(np.all(left_out < self.ref.kth_cosine - self._windows(max_row_shift)))

    def batches(self, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        vocab = self.matrix.shape[0]
        # The full search's seed is scored on the measuring thread while the first chunk is encoded.
        measured: Callable[[], Any] = in_order(self._seed_full_search) if not self.pruned else (lambda: None)
        with progress_bar(total=vocab, desc=f"quantize {self.scheme.name}", unit="rows") as bar:
            for index, (start, stop) in enumerate(row_chunks(vocab, ROWS_PER_CHUNK)):
                rows = self.matrix[start:stop]  # [n, dim]
                encoded, restored, errors = encode_decode_measure(self.scheme, rows)
                sums = self.sums[index] if self.sums is not None else original_sums(rows)
                # The previous chunk is measured while this one was encoded; chunks are
                # folded in one at a time and in order, so every sum is as in one thread.
                measured()
                measured = in_order(self._measure, start, restored, errors, encoded.clipped, sums)
                yield record_batch(np.arange(start, stop, dtype=np.int32), encoded, schema)
                bar.update(stop - start)
            measured()
        if self.pruned:
            self._finish_neighbours()
        else:
            self._screen_rows_before()
            self._finish_screen()

    def _measure(self, start: int, restored: np.ndarray, errors: RowErrors, clipped: int, sums: OriginalSums) -> None:
        """Fold a chunk (its dequantized rows [n, dim] and their errors) into the error and the neighbours."""
        cosines = self.errors.add_chunk(errors, clipped, sums)
        if self.pruned:
            # |u - v| of unit vectors is sqrt(2 - 2 cos); a zero row against a non-zero
            # one has cosine 0 here, giving sqrt(2) >= the true distance 1.
            shift = float(np.sqrt(max(0.0, 2.0 - 2.0 * float(cosines.min())))) if len(cosines) else 0.0
            self.max_row_shift = max(self.max_row_shift, shift)
            if self._window_covered(self.max_row_shift):
                return
            # The error is larger than the sampled rows showed: the full search from this
            # chunk on, and for the rows before it once the pass is done.
            self.pruned, self.screen_before = False, start
            self._seed_full_search()
        self.top.add(start, restored, norms=errors.norms)

    def _screen_rows_before(self) -> None:
        """The full search over the rows measured before the pruned pass gave way (none if it never ran)."""
        if not self.screen_before:
            return
        with progress_bar(total=self.screen_before, desc=f"neighbours {self.scheme.name}", unit="rows") as bar:
            for start, stop in row_chunks(self.screen_before, ROWS_PER_CHUNK):
                self.top.add(start, encode_decode(self.scheme, self.matrix[start:stop])[1])
                bar.update(stop - start)

    def _finish_screen(self) -> None:
        self.neighbours = self.top.finish().ids
        if self.top.bound_held:
            return
        # A screen score broke its error bound (a bfloat16 kernel that does not accumulate
        # in float32): search again with the engine's float32 screen.
        vocab = self.matrix.shape[0]
        top = TopK(self.units, self.k, excluding_own(self.queries.self_rows), f"neighbours {self.scheme.name}", vocab)
        for start, stop in row_chunks(vocab, ROWS_PER_CHUNK):
            top.add(start, encode_decode(self.scheme, self.matrix[start:stop])[1])
        self.neighbours = top.finish().ids

    def _finish_neighbours(self) -> None:
        if self.errors.sum_sq_error == 0.0 and self.errors.max_abs_error == 0.0 and not np.any(self.query_shift):
            # Nothing was lost (a Q8_0 source under q8_0, a bf16 source under bf16): the
            # dequantized matrix is the original, so are its neighbours, ties and all.
            self.neighbours = self.ref.neighbours.copy()
            return
        # The rows a query's window can hold are among its candidates that reach the window;
        # they are scored on the dequantized matrix and the k best kept.
        ids, ref = self.ref.candidate_ids, self.ref
        floor = ref.kth_cosine - self._windows(self.max_row_shift)  # [q]
        inside = (ref.reach(ref.candidate_scores, ref.candidate_slack[:, None]) >= floor[:, None]) & (ids >= 0)
        query, row = np.nonzero(inside)[0], ids[inside]  # [m] pairs
        mine = row != self.queries.self_rows[query]  # a query is never its own neighbour
        self.neighbours = best_of_pairs(self.units, query[mine], row[mine], self.k, self.restore).ids

    def metrics(self, ref: Reference, bytes_on_disk: int) -> dict[str, Any]:
        shape = self.matrix.shape
        bits = self.scheme.bits_per_weight(shape)
        tokens = len(self.queries.token_rows)
        words_change = np.abs(similarity_table(self.words) - ref.word_similarity).max() if len(self.words) else None
        return {
            "bits_per_weight": bits,
            "bytes_on_disk": bytes_on_disk,
            "compression_vs_float32": 32 / bits,
            "compression_vs_source": ref.source_bits / bits if ref.source_bits else None,
            **self.errors.summary(),
            "recall_k": self.k,
            "tokens_recall_at_k": recall(ref.neighbours[:tokens], self.neighbours[:tokens]),
            "words_recall_at_k": recall(ref.neighbours[tokens:], self.neighbours[tokens:]),
            "words_similarity_max_change": float(words_change) if words_change is not None else None,
        }


# Row groups of a quant file that may wait for its writer: the 16-bit schemes write slower
# than they encode, so their encoding runs ahead and the next scheme starts while the
# writer catches up (32 MiB of fp16 codes on the 1B; four gained no more).
QUEUED_ROW_GROUPS = 2


def start_scheme(
    scheme: Scheme,
    matrix: np.ndarray,
    queries: Queries,
    ref: Reference,
    k: int,
    path: Path,
    provenance: dict,
    sums: list[OriginalSums] | None = None,
) -> Callable[[], dict[str, Any]]:
    """Start writing ``path`` for ``scheme`` (already fitted); ``sums`` as :attr:`SchemeRun.sums`.

    Returns once every chunk is encoded and measured, with the writer still finishing the
    file: the returned call waits for it and gives the scheme's metrics."""
    dim = matrix.shape[1]
    record = {**provenance, "scheme": scheme.name, "shape": list(matrix.shape), "dequantize": scheme.recipe(dim)}
    schema = with_provenance(quant_schema(scheme, dim), record)
    run = SchemeRun(scheme, matrix, queries, k, ref, sums)
    written = start_writing(
        path, schema, run.batches(schema), queued=QUEUED_ROW_GROUPS, row_group_size=ROWS_PER_CHUNK, **quant_write_options(schema)
    )

    def metrics() -> dict[str, Any]:
        written()
        return run.metrics(ref, written_path(path).stat().st_size)

    return metrics


def quantize_all(
    schemes: list[Scheme],
    matrix: np.ndarray,
    queries: Queries,
    ref: Reference,
    k: int,
    paths: ModelPaths,
    provenance: dict,
    sums: list[OriginalSums],
) -> dict[str, Any]:
    """Every scheme's quant file and metrics, by scheme name; each scheme starts while the
    previous one's writer finishes its file (:func:`start_scheme`)."""
    metrics: dict[str, Any] = {}
    pending: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    try:
        for scheme in schemes:
            # Between schemes, not between chunks: the chunks of a scheme reuse the buffers the
            # threads freed, and the next scheme starts from none. Keeping them from scheme to
            # scheme saved 100 000 page faults on the 1B (0.2-0.5 s) but let glibc's arenas
            # grow to 0.15 GB more at the peak, which then sat at 2x the float32 matrix.
            return_freed_memory()
            pending.append((scheme.name, start_scheme(scheme.fit(matrix), matrix, queries, ref, k, paths.quant_file(scheme.name), provenance, sums)))
            while len(pending) > 1:
                name, finish = pending.pop(0)
                metrics[name] = finish()
        while pending:
            name, finish = pending.pop(0)
            metrics[name] = finish()
    finally:
        for _, finish in pending:  # after a failure: no writer is left running when the outputs are discarded
            with contextlib.suppress(Exception):
                finish()
    return metrics


def _load_libraries() -> None:
    """What the first chunk would otherwise wait for, loaded while the matrix is read: torch
    (the screen's products; about a second) and numba's registries, which its first compiled
    call in a process loads (about half a second)."""
    import torch  # noqa: F401

    from pipeline.core.bfloat16 import bfloat16_bits_of

    bfloat16_bits_of(np.zeros(1, np.float32), np.zeros(1, np.uint16))


def run(paths: ModelPaths, settings: QuantizeSettings) -> dict[str, Any]:
    """The stage on one model; returns the quant.json content."""
    start_in_background(_load_libraries, "load libraries")
    matrix = read_matrix(paths.embeddings)  # [vocab, dim]; the reader hands back what it freed
    vocab, dim = matrix.shape
    if settings.recall_k >= vocab:
        raise DissectError(f"quantize.recall_k is {settings.recall_k} but {paths.name} has only {vocab} tokens; lower it")
    schemes = schemes_for(settings.schemes, dim)  # every mistake is found before anything is written
    words, pooling = word_queries(paths, vocab)
    sums = chunk_map(lambda start, stop: original_sums(matrix[start:stop]), vocab, ROWS_PER_CHUNK)  # once for every scheme
    sample = sample_token_rows(inverse_of_norms(np.concatenate([s.norms for s in sums])), settings.sample_tokens, settings.seed)
    queries = Queries(sample, words, pooling=pooling)
    ref = reference(matrix, queries, settings.recall_k, read_provenance(paths.embeddings).get("source_dtype"), sums)
    # The words' own params (as the words stage recorded them) say which words were measured.
    words_params = read_provenance(paths.words).get("params", {}).get("words")
    provenance = derived_provenance("quantize", paths.name, paths.embeddings, {"quantize": as_params(settings), "words": words_params})
    with output_set():
        metrics = quantize_all(schemes, matrix, queries, ref, settings.recall_k, paths, provenance, sums)
        write_json_atomic(paths.quant_metrics, metrics)
    return metrics


main = Stage("quantize", "MODEL", model_paths, from_section(QuantizeSettings, "quantize"), run).main


if __name__ == "__main__":
    run_stage(main)
