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
near one float32 copy of the matrix. The codes are written by a second thread (integer codes
dictionary encoded, see :func:`pipeline.quant.layout.quant_write_options`), a chunk is measured while the next is
encoded, and the neighbours are searched through the bfloat16 screen of
:mod:`pipeline.quant.screen`, whose result is exact.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.memory import return_freed_memory
from pipeline.core.io import output_set, write_json_atomic, written_path
from pipeline.core.knn import MAX_K
from pipeline.core.params import model_paths
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import as_params, from_section, list_of, one_of, setting, whole_number
from pipeline.lookup import POOLINGS, pool
from pipeline.core.parquet import (
    derived_provenance,
    read_matrix,
    read_provenance,
    with_provenance,
    write_batches,
)
from pipeline.core.progress import progress_bar
from pipeline.quant import SCHEMES, Encoded, Scheme, schemes_for
from pipeline.quant.layout import quant_schema, quant_write_options, record_batch
from pipeline.quant.measure import (
    ErrorStats,
    OriginalSums,
    TopK,
    inverse_of_norms,
    original_sums,
    recall,
    row_dots_and_norms,
    similarity_table,
    unit_rows,
)
from pipeline.quant.screen import ScreenedTopK, exact_best

ROWS_PER_CHUNK = 4096
# Chunks between two returns of freed memory: the chunk buffers of several threads leave
# freed pages behind that would otherwise pile up (~0.2 GB over a 1B scheme); refaulting
# them costs ~2 ms per 32 MB.
TRIM_EVERY = 8
FLOAT_BITS = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16, "F64": 64, "F32": 32, "F16": 16, "BF16": 16}


@dataclass(frozen=True)
class QuantizeSettings:
    schemes: list[str] = setting(list(SCHEMES), list_of(one_of(*SCHEMES), min_items=1, unique=True))
    # Seeded sample of tokens whose nearest neighbours measure recall@k after quantization.
    sample_tokens: int = setting(1000, whole_number(0, 1_000_000))
    recall_k: int = setting(10, whole_number(1, MAX_K))
    seed: int = setting(0, whole_number(0, 2**32 - 1))


@dataclass(frozen=True)
class WordQuery:
    text: str  # as looked up: "Hello" or " Hello"
    token_ids: tuple[int, ...]


def pool_rows(rows: np.ndarray, pooling: str) -> np.ndarray:
    """One vector [dim] from a word's token rows [n, dim], pooled exactly as the words stage pools."""
    return pool(rows[None], np.ones((1, len(rows)), dtype=bool), pooling)[0]


@dataclass(frozen=True)
class Queries:
    """The rows whose neighbours are compared: sampled tokens, then the words."""

    token_rows: np.ndarray  # [t] int64, sorted
    words: list[WordQuery]
    pooling: str = "mean"  # as the words stage pools a word that splits: mean | first | last

    def vectors(self, rows_of: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(token vectors [t, dim], word vectors [w, dim]) from ``rows_of(row indices) -> rows``."""
        tokens = rows_of(self.token_rows)
        words = [pool_rows(rows_of(np.array(word.token_ids, dtype=np.int64)), self.pooling) for word in self.words]
        dim = tokens.shape[1]
        return tokens, np.array(words, dtype=np.float32).reshape(len(words), dim)

    @property
    def self_rows(self) -> np.ndarray:
        """[t + w]: the row each query is, never its own neighbour; -1 for words."""
        return np.concatenate([self.token_rows, np.full(len(self.words), -1, dtype=np.int64)])


@dataclass(frozen=True)
class Reference:
    """What the original matrix gives, computed once and compared with every scheme."""

    neighbours: np.ndarray  # [t + w, k] row ids
    word_similarity: np.ndarray  # [w, w]
    source_bits: float | None
    # For the pruned recall (see SchemeRun): each query's unit vector and k-th best cosine,
    # and its CANDIDATES best rows by a score within candidate_slack + candidate_out |score|
    # of the original cosine (-inf for unfilled slots, +inf for a query without a list):
    # every row left out has a cosine of at most the lowest score plus that bound.
    query_units: np.ndarray | None = None  # [t + w, dim] float32
    kth_cosine: np.ndarray | None = None  # [t + w] float64
    candidate_ids: np.ndarray | None = None  # [t + w, CANDIDATES] int64
    candidate_scores: np.ndarray | None = None  # [t + w, CANDIDATES] float32
    candidate_slack: np.ndarray | None = None  # [t + w] float64
    candidate_out: float = 0.0

    def reach(self, scores: np.ndarray, slack: np.ndarray) -> np.ndarray:
        """The highest original cosine a candidate score can stand for (``slack`` broadcast to it)."""
        with np.errstate(invalid="ignore"):
            bound = scores + self.candidate_out * np.abs(scores) + slack
        return np.where(np.isneginf(scores), -np.inf, bound)


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


def sample_token_rows(norms_inverse: np.ndarray, size: int, seed: int) -> np.ndarray:
    """[min(size, nonzero rows)] sorted row indices, drawn without replacement.

    Zero rows (padding, unused tokens) are left out: every row is equally near them, so they
    have no neighbours to recall.
    """
    candidates = np.flatnonzero(norms_inverse > 0)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(size, len(candidates)), replace=False)).astype(np.int64)


_POOL: list = []
MIN_ROWS_PER_THREAD = 256


def _split_map(function: Callable[[np.ndarray], Any], rows: np.ndarray) -> list[Any]:
    """``function`` on consecutive row slices of ``rows``, one per core, results in row order.

    The schemes' kernels are numpy (and torch) calls that release the GIL, so the cores
    share a chunk; rows are independent once a scheme is fitted, so the split changes no value.
    """
    return _span_map(lambda span: function(rows[span[0] : span[1]]), len(rows))


def _span_map(function: Callable[[tuple[int, int]], Any], rows: int) -> list[Any]:
    """``function((start, stop))`` for consecutive spans of ``rows`` rows, one per core, in order."""
    from pipeline.core.memory import worker_count

    workers = worker_count()
    if workers == 1 or rows < 2 * MIN_ROWS_PER_THREAD:
        return [function((0, rows))]
    bounds = np.linspace(0, rows, workers + 1).astype(int)
    return list(_pool(workers).map(function, list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))))


def _pool(workers: int) -> Any:
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        # One more thread than cores: a chunk's error runs beside its neighbour search
        # while the next chunk is encoded on the cores.
        _POOL.append(ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix="quantize"))
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="measure"))
    return _POOL[0]


def in_order(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start ``function(*args)`` on the single measuring thread; the returned call waits for it.

    Calls started this way run one after another in the order they were started. Runs it
    right away when there is one core.
    """
    return _submit(1, function, *args)


def beside(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start ``function(*args)`` on another core; the returned call waits for its result.

    Runs it right away when there is one core.
    """
    return _submit(0, function, *args)


def _submit(pool_index: int, function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``function(*args)`` on ``_POOL[pool_index]`` (0: the cores, 1: the measuring thread), or now on one core."""
    from pipeline.core.memory import worker_count

    workers = worker_count()
    if workers == 1:
        result = function(*args)
        return lambda: result
    _pool(workers)
    return _POOL[pool_index].submit(function, *args).result


def _joined(parts: list[Encoded]) -> Encoded:
    if len(parts) == 1:
        return parts[0]
    scales = None if parts[0].scales is None else np.concatenate([p.scales for p in parts])
    return Encoded(codes=np.concatenate([p.codes for p in parts]), scales=scales, clipped=sum(p.clipped for p in parts))


def encode_rows(scheme: Scheme, rows: np.ndarray) -> Encoded:
    """``scheme.encode(rows)``, spread over the cores."""
    return _joined(_split_map(scheme.encode, rows))


def encode_decode(scheme: Scheme, rows: np.ndarray) -> tuple[Encoded, np.ndarray]:
    """(``scheme.encode(rows)``, its decoded float32 rows), spread over the cores.

    Each core decodes its rows straight into the one output array, so the decoded chunk is
    never copied; a scheme whose codes are the decoded rows (fp16, bf16) has them returned.
    """
    restored = np.empty(rows.shape, dtype=np.float32)  # [n, dim]

    def both(span: tuple[int, int]) -> tuple[Encoded, bool]:
        encoded = scheme.encode(rows[span[0] : span[1]])
        decoded = scheme.decode(encoded, out=restored[span[0] : span[1]])
        return encoded, decoded is encoded.codes

    parts = _span_map(both, len(rows))
    encoded = _joined([part for part, _ in parts])
    return encoded, encoded.codes if all(same for _, same in parts) else restored


def row_chunks(rows: int, rows_per_chunk: int = ROWS_PER_CHUNK) -> Iterator[tuple[int, int]]:
    for start in range(0, rows, rows_per_chunk):
        yield start, min(start + rows_per_chunk, rows)


# The pruned recall keeps each query's best CANDIDATES rows of the original matrix; a
# scheme whose error could move a row farther than that list reaches is measured in full.
CANDIDATES = 512
PRUNE_MIN_ROWS = 8 * ROWS_PER_CHUNK  # below this the full pass is cheap anyway
SCORE_SLACK = 1e-3  # float32 rounding of the cosines, with a wide margin


def reference(
    matrix: np.ndarray, queries: Queries, k: int, source_dtype: str | None, sums: list[OriginalSums] | None = None
) -> Reference:
    """The neighbours of the original matrix (exact, through the screen), and the candidate
    lists that prune fine schemes when the matrix is large; ``sums`` as :attr:`SchemeRun.sums`."""
    tokens, words = queries.vectors(lambda rows: matrix[rows])
    units = unit_rows(np.concatenate([tokens, words]))  # [t + w, dim]
    similarity, bits = similarity_table(words), source_bits(source_dtype)
    keep = min(CANDIDATES, matrix.shape[0])
    prune = matrix.shape[0] >= PRUNE_MIN_ROWS and keep > k
    top = ScreenedTopK(units, queries.self_rows, k, keep=keep if prune else 0)
    with progress_bar(total=matrix.shape[0], desc="neighbours (original)", unit="rows") as bar:
        for index, (start, stop) in enumerate(row_chunks(matrix.shape[0])):
            top.add(start, matrix[start:stop], sums[index].norms if sums is not None else None)
            bar.update(stop - start)
    if not top.finish():
        return reference_float32(matrix, units, queries.self_rows, k, keep if prune else k, similarity, bits)
    if not prune:
        return Reference(neighbours=top.ids, word_similarity=similarity, source_bits=bits)
    return Reference(
        neighbours=top.ids,
        word_similarity=similarity,
        source_bits=bits,
        query_units=units,
        kth_cosine=top.scores[:, -1],
        candidate_ids=top.candidate_ids,
        candidate_scores=top.candidate_scores,
        candidate_slack=top.candidate_slack,
        candidate_out=top.precision.out,
    )


def reference_float32(
    matrix: np.ndarray, units: np.ndarray, self_rows: np.ndarray, k: int, keep: int, similarity: np.ndarray, bits: float | None
) -> Reference:
    """:func:`reference` by a plain float32 search, for when the screen broke its bound."""
    top = TopK(units, self_rows, keep)
    with progress_bar(total=matrix.shape[0], desc="neighbours (original, float32)", unit="rows") as bar:
        for start, stop in row_chunks(matrix.shape[0]):
            top.add(start, matrix[start:stop])
            bar.update(stop - start)
    best = np.argsort(-top.scores, axis=1, kind="stable")[:, :k]  # [q, k]: the k best of the kept, best first
    neighbours, scores = np.take_along_axis(top.ids, best, axis=1), np.take_along_axis(top.scores, best, axis=1)
    if keep == k:
        return Reference(neighbours=neighbours, word_similarity=similarity, source_bits=bits)
    return Reference(
        neighbours=neighbours,
        word_similarity=similarity,
        source_bits=bits,
        query_units=units,
        kth_cosine=scores[:, -1].astype(np.float64),
        candidate_ids=top.ids,
        candidate_scores=top.scores,
        candidate_slack=np.zeros(len(units)),  # float32 cosines: SCORE_SLACK in the windows covers them
    )


def source_bits(dtype: str | None) -> float | None:
    """Bits per weight of the source dtype (torch or GGML names); None when unknown."""
    if dtype in FLOAT_BITS:
        return float(FLOAT_BITS[dtype])
    import gguf

    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[dtype]]
    except KeyError:
        return None
    return type_size * 8 / block


@dataclass
class SchemeRun:
    """One scheme over the whole matrix: codes to Parquet, error and neighbours measured on the way.

    The neighbours of the dequantized matrix are exact, found one of two ways:

    * in full: every chunk's dequantized rows against every query, through the bfloat16
      screen of :mod:`pipeline.quant.screen` (exact: the rows it cannot rule out are
      rescored in float64);
    * pruned, when ``ref`` carries candidates: a query's cosine with a row moves by at most
      ``delta_q + eps_j`` (the distances between the original and dequantized unit vectors of
      the query and of the row), so a row can enter the dequantized top-k only if its original
      cosine is within ``2 (delta_q + eps_max)`` of the original k-th best. When each query's
      candidate list reaches below that window, the top-k is found among those rows alone;
      otherwise (a coarse scheme) the full pass runs after all. The sampled token queries
      are themselves rows, so their deltas predict the window before the pass starts.
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
        self.top = ScreenedTopK(self.units, self.queries.self_rows, self.k)
        self.max_row_shift = 0.0  # eps_max: largest distance between a row's unit vectors
        self.pruned = False
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
        return self.scheme.decode(self.scheme.encode(self.matrix[rows]))

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
        measured: Callable[[], Any] = lambda: None
        with progress_bar(total=vocab, desc=f"quantize {self.scheme.name}", unit="rows") as bar:
            for index, (start, stop) in enumerate(row_chunks(vocab)):
                rows = self.matrix[start:stop]  # [n, dim]
                encoded, restored = encode_decode(self.scheme, rows)
                sums = self.sums[index] if self.sums is not None else original_sums(rows)
                # The previous chunk is measured while this one was encoded; chunks are
                # folded in one at a time and in order, so every sum is as in one thread.
                measured()
                measured = in_order(self._measure, start, rows, restored, encoded.clipped, sums)
                yield record_batch(np.arange(start, stop, dtype=np.int32), encoded, schema)
                bar.update(stop - start)
                if index % TRIM_EVERY == TRIM_EVERY - 1:
                    return_freed_memory()
            measured()
        if self.pruned:
            self._finish_neighbours()
        else:
            self._finish_screen()

    def _measure(self, start: int, rows: np.ndarray, restored: np.ndarray, clipped: int, sums: OriginalSums) -> None:
        """Fold a chunk (original and dequantized rows [n, dim]) into the error and the neighbours."""
        dots, norms = row_dots_and_norms(rows, restored)  # [n], [n] float64, for both
        if self.pruned:
            cosines = self.errors.add_chunk(rows, restored, clipped, sums, dots, norms)
            # |u - v| of unit vectors is sqrt(2 - 2 cos); a zero row against a non-zero
            # one has cosine 0 here, giving sqrt(2) >= the true distance 1.
            shift = float(np.sqrt(max(0.0, 2.0 - 2.0 * float(cosines.min())))) if len(cosines) else 0.0
            self.max_row_shift = max(self.max_row_shift, shift)
            return
        # The error's passes are single-threaded numpy; they run beside the screen, whose
        # own single-threaded steps leave a core free between its matrix products.
        errors_done = beside(self.errors.add_chunk, rows, restored, clipped, sums, dots, norms)
        self.top.add(start, restored, norms)
        errors_done()

    def _finish_screen(self) -> None:
        if self.top.finish():
            return
        # A screen score broke its error bound (a bfloat16 kernel that does not accumulate
        # in float32): search again without the screen, in plain float32.
        self.top = TopK(self.units, self.queries.self_rows, self.k)
        with progress_bar(total=self.matrix.shape[0], desc=f"neighbours {self.scheme.name}", unit="rows") as bar:
            for start, stop in row_chunks(self.matrix.shape[0]):
                _, restored = encode_decode(self.scheme, self.matrix[start:stop])
                self.top.add(start, restored)
                bar.update(stop - start)

    def _finish_neighbours(self) -> None:
        if self.errors.sum_sq_error == 0.0 and self.errors.max_abs_error == 0.0 and not np.any(self.query_shift):
            # Nothing was lost (a Q8_0 source under q8_0, a bf16 source under bf16): the
            # dequantized matrix is the original, so are its neighbours, ties and all.
            self.top.ids = self.ref.neighbours.copy()
            return
        if not self._window_covered(self.max_row_shift):
            self.pruned = False  # the error was larger than the sampled rows showed
            with progress_bar(total=self.matrix.shape[0], desc=f"neighbours {self.scheme.name}", unit="rows") as bar:
                for start, stop in row_chunks(self.matrix.shape[0]):
                    _, restored = encode_decode(self.scheme, self.matrix[start:stop])
                    self.top.add(start, restored)
                    bar.update(stop - start)
            self._finish_screen()
            return
        # The rows a query's window can hold are among its candidates that reach the window;
        # they are scored on the dequantized matrix and the k best kept.
        ids, ref = self.ref.candidate_ids, self.ref
        floor = ref.kth_cosine - self._windows(self.max_row_shift)  # [q]
        inside = (ref.reach(ref.candidate_scores, ref.candidate_slack[:, None]) >= floor[:, None]) & (ids >= 0)
        query, row = np.nonzero(inside)[0], ids[inside]  # [m] pairs
        self.top.ids, self.top.scores = exact_best(self.units, query, row, self.queries.self_rows, self.k, self.restore)

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
            "tokens_recall_at_k": recall(ref.neighbours[:tokens], self.top.ids[:tokens]),
            "words_recall_at_k": recall(ref.neighbours[tokens:], self.top.ids[tokens:]),
            "words_similarity_max_change": float(words_change) if words_change is not None else None,
        }


def quantize_scheme(
    scheme: Scheme,
    matrix: np.ndarray,
    queries: Queries,
    ref: Reference,
    k: int,
    path: Path,
    provenance: dict,
    sums: list[OriginalSums] | None = None,
) -> dict[str, Any]:
    """Write ``path`` for ``scheme`` (already fitted) and return its metrics; ``sums`` as :attr:`SchemeRun.sums`."""
    dim = matrix.shape[1]
    record = {**provenance, "scheme": scheme.name, "shape": list(matrix.shape), "dequantize": scheme.recipe(dim)}
    schema = with_provenance(quant_schema(scheme, dim), record)
    run = SchemeRun(scheme, matrix, queries, k, ref, sums)
    write_in_background(path, schema, run.batches(schema))
    return run.metrics(ref, written_path(path).stat().st_size)


class _Abandoned(Exception):
    """Raised inside the writer when the producer failed, so the file is not completed."""


def write_in_background(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    """:func:`write_batches` in a second thread while this one computes the next batches.

    Encoding ``fixed_size_list`` columns into Parquet runs at 120-230 M values/s a core (see
    :func:`pipeline.quant.layout.quant_write_options`), about as long as the work that produces them; pyarrow
    releases the GIL while it writes, so the two overlap.
    If producing fails, the writer abandons its temporary file and the error is raised here.
    """
    handoff: queue.Queue[Any] = queue.Queue(maxsize=1)  # bounded: one chunk waits while one is written
    finished, failed = object(), object()
    ended = threading.Event()
    errors: list[BaseException] = []

    def is_end(item: Any) -> bool:
        return item is finished or item is failed

    def received() -> Iterator[pa.RecordBatch]:
        while not is_end(item := handoff.get()):
            yield item
        ended.set()
        if item is failed:
            raise _Abandoned()

    def write() -> None:
        try:
            write_batches(path, schema, received(), row_group_size=ROWS_PER_CHUNK, **quant_write_options(schema))
        except BaseException as error:  # raised in the producer's thread below
            errors.append(error)
            while not ended.is_set():  # keep taking batches so a waiting producer can finish
                if is_end(handoff.get()):
                    ended.set()

    writer = threading.Thread(target=write, name=f"write {path.name}", daemon=True)
    writer.start()
    end = failed
    try:
        for batch in batches:
            if errors:
                break
            handoff.put(batch)
        end = finished
    finally:
        handoff.put(end)
        writer.join()
    if errors:
        raise errors[0]


def run(paths: ModelPaths, settings: QuantizeSettings) -> dict[str, Any]:
    """The stage on one model; returns the quant.json content."""
    matrix = read_matrix(paths.embeddings)  # [vocab, dim]
    return_freed_memory()  # the reader's Arrow buffers
    vocab, dim = matrix.shape
    if settings.recall_k >= vocab:
        raise DissectError(f"quantize.recall_k is {settings.recall_k} but {paths.name} has only {vocab} tokens; lower it")
    schemes = schemes_for(settings.schemes, dim)  # every mistake is found before anything is written
    words, pooling = word_queries(paths, vocab)
    sums = chunk_map(lambda start, stop: original_sums(matrix[start:stop]), vocab)  # once for every scheme
    sample = sample_token_rows(inverse_of_norms(np.concatenate([s.norms for s in sums])), settings.sample_tokens, settings.seed)
    queries = Queries(sample, words, pooling=pooling)
    ref = reference(matrix, queries, settings.recall_k, read_provenance(paths.embeddings).get("source_dtype"), sums)
    # The words' own params (as the words stage recorded them) say which words were measured.
    words_params = read_provenance(paths.words).get("params", {}).get("words")
    provenance = derived_provenance("quantize", paths.name, paths.embeddings, {"quantize": as_params(settings), "words": words_params})
    with output_set():
        metrics = {}
        for scheme in schemes:
            return_freed_memory()
            fitted = scheme.fit(matrix)
            metrics[scheme.name] = quantize_scheme(fitted, matrix, queries, ref, settings.recall_k, paths.quant_file(scheme.name), provenance, sums)
        write_json_atomic(paths.quant_metrics, metrics)
    return metrics


def chunk_map(function: Callable[[int, int], Any], rows: int) -> list[Any]:
    """``[function(start, stop) for each chunk of rows]``, the chunks shared among the cores."""
    from pipeline.core.memory import worker_count

    chunks = list(row_chunks(rows))
    workers = worker_count()
    if workers == 1:
        return [function(start, stop) for start, stop in chunks]
    return list(_pool(workers).map(lambda chunk: function(*chunk), chunks))


main = Stage("quantize", "MODEL", model_paths, from_section(QuantizeSettings, "quantize"), run).main


if __name__ == "__main__":
    run_stage(main)
