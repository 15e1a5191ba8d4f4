"""The bounded screen of :class:`pipeline.core.knn.TopK` (``screen="bfloat16"``): which rows of a
chunk may still enter a query's top k, from one low-precision product and a proven error bound.

Measuring a coarse scheme's recall scores every dequantized row against every query
(about a thousand queries x the vocabulary x dim multiply-adds), which in float32 was most
of the quantize stage. Where the CPU multiplies bfloat16 natively (AVX512-BF16, AMX) the
same product runs about four times faster, and the error of each of its scores has a bound
that holds for every (query, row) pair:

    |screen score - cosine| <= E + c |screen score|

A row can then be among query q's k best only if its screen score plus that bound reaches
L_q, a lower bound on q's k-th best cosine (from the exact cosines the engine kept so far and
this chunk's best screen scores minus their bound). The rows that pass, a few dozen per query
over the whole vocabulary, are scored by the engine in float64 straight away, so the result
is the exact top k by cosine, not an approximation. Without native bfloat16 the screen runs
in float32, where the bound is nearly zero.

The cosine is the engine's one float64 formula: the query's unit row times the row's unit
row (:func:`pipeline.core.knn.unit_rows`, float32), summed in float64. The bound, for a
float32 unit query u and a row r of direction w = r / |r| and unit row w' (w rounded to
float32, |w' - w| <= 2^-24):

* the query is rounded to the screen's type once: e_q = |round(u) - u|, measured;
* the row is scaled by its float32 inverse norm (relative error below 2^-23 per value) and
  rounded: |round(r * inv) - w'| <= f, the largest rounding residual of the chunk's rows,
  measured, plus 2^-22 (which covers the scaling and w' - w);
* so the exact product of the rounded vectors is within e_q (1 + f) + |u| f of the cosine;
* accumulated in float32 over dim terms in any order, the computed product is within
  gamma (|u| + e_q)(1 + f) of the exact one, gamma = dim 2^-24 / (1 - dim 2^-24);
* a bfloat16 result is rounded once more, relative error c' <= 2^-7 (one more bit than
  round-to-nearest needs, so truncation is covered too): c = c' / (1 - c').

Every pair scored exactly is checked against its bound; a kernel that broke it (one that
does not accumulate in float32) makes the engine report it (``TopK.bound_held``), and the
caller runs the plain float32 search instead.

Asked to ``keep`` more, it also keeps each query's best rows by screen score, with the
bound: every row left out has a cosine of at most the lowest kept score plus its bound.
The quantize stage prunes the recall of fine schemes with those lists.

On a CUDA device (:mod:`pipeline.core.device`) the product runs there in bfloat16 (float32
accumulation, reduced-precision reductions off) and its scores come back to the CPU, where
everything else above happens as on the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.determinism import row_norms
from pipeline.core.device import compute_device

FLOAT32_UNIT = 2.0**-24
SCALING = 2.0**-22  # |r * inv - w'| / |w| for float32 inv and products, and w' - w, with margin
TINY = 1e-30  # flushed subnormal products and inputs: at most dim * 2^-126 in all
DIRECTION_ROWS = 512  # rows scaled and rounded at a time: 4 MB of float32 at dim 2048
SLOTS = 2  # chunks whose screen scores can be held at once


def native_bfloat16(device: str | None = None) -> bool:
    """Whether torch multiplies bfloat16 natively on ``device`` (None: numpy's CPU, i.e. torch's
    CPU), else it emulates it, slower than float32."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return bool(torch.cuda.is_bf16_supported())

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False


@dataclass(frozen=True)
class ScreenPrecision:
    """The screen's number type and the constants of its error bound."""

    dtype: Any  # torch.bfloat16 or torch.float32
    rounds: bool  # whether float32 values change when stored as dtype
    out: float  # c: relative error of a result, against its own magnitude

    @staticmethod
    def choose(device: str | None = None) -> ScreenPrecision:
        """bfloat16 where the products run natively in it (a CUDA device with bfloat16, a CPU
        with AVX512-BF16 or AMX), else float32."""
        import torch

        if native_bfloat16(device):
            output = 2.0**-7
            return ScreenPrecision(torch.bfloat16, True, output / (1 - output))
        return ScreenPrecision(torch.float32, False, 0.0)


def inverse_norms(norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n] inverse norms, bool [n] rows a float32 inverse cannot scale) from float64 ``norms`` [n].

    Zero rows keep inverse 0 (cosine 0 with everything); rows with an infinite or NaN value,
    or a norm too small for a float32 inverse, are flagged (the engine never returns the
    first kind and scales the second in float64).
    """
    with np.errstate(divide="ignore", over="ignore"):
        inverse = np.where(norms > 0, 1.0 / norms, 0.0).astype(np.float32)  # [n]
    unscaled = ~np.isfinite(norms) | ~np.isfinite(inverse)  # [n]
    inverse[unscaled] = 0
    return inverse, unscaled


def rounded_directions(
    rows: np.ndarray, inverse: np.ndarray, precision: ScreenPrecision, target: Any, exact: dict[int, np.ndarray]
) -> float:
    """Fill ``target`` (torch [n, dim]) with each row times its inverse norm, rounded to the
    screen's type (``exact`` maps a row to its unit row where the float32 inverse cannot
    scale it; rows with inverse 0 are zero); return the largest rounding residual
    |round(x) - x| of a row.

    Done a few hundred rows at a time, so the float32 product never exists whole and the
    residual is measured while the piece is in cache.
    """
    import torch

    n = len(rows)
    if precision.dtype == torch.bfloat16 and not exact and target.device.type == "cpu":
        return _bfloat16_directions(rows, inverse, target)
    source, scale = torch.from_numpy(rows), torch.from_numpy(inverse)
    largest = 0.0
    for start in range(0, n, DIRECTION_ROWS):
        stop = min(start + DIRECTION_ROWS, n)
        part = source[start:stop] * scale[start:stop, None]  # [b, dim] float32
        for row, unit in exact.items():
            if start <= row < stop:
                part[row - start] = torch.from_numpy(unit)  # also replaces inf * 0 = NaN
        target[start:stop] = part
        if precision.rounds:
            # x - round(x) is exact in float32 (the two are within a factor of two); the
            # float32 norm of it is within 1e-3 of the true one.
            part -= target[start:stop].float()
            largest = max(largest, float(torch.linalg.vector_norm(part, dim=1).max()) * (1 + 1e-3))
    return largest


def _bfloat16_directions(rows: np.ndarray, inverse: np.ndarray, target: Any) -> float:
    """:func:`rounded_directions` into a bfloat16 ``target`` by the compiled pass
    (:mod:`pipeline.core.bfloat16`). It runs on the calling thread: a few milliseconds a
    chunk, which queued behind other work on the cores would wait longer than it takes."""
    import torch

    from pipeline.core.bfloat16 import bfloat16_directions

    bits = target.view(torch.int16).numpy().view(np.uint16)  # [n, dim], the target's memory
    return bfloat16_directions(np.ascontiguousarray(rows, dtype=np.float32), inverse, bits)


def _score_bits(screen: Any) -> np.ndarray:
    """The screen's scores (torch [s, n]) as numpy without a copy: float32, or bfloat16 as its
    uint16 bits, as :func:`pipeline.core.knn_kernels.screen_hits` reads them."""
    import torch

    return screen.view(torch.int16).numpy().view(np.uint16) if screen.dtype == torch.bfloat16 else screen.numpy()


class BoundedScreen:
    """The screened queries of a search and what each chunk's screen keeps of the rows.

    ``units`` [q, dim] are the queries' unit rows; only those with a direction are screened
    (``screened`` [s] their indices); a query without one scores 0 against every row.
    """

    def __init__(self, units: np.ndarray, keep: int, precision: ScreenPrecision | None):
        import torch

        self.device = compute_device()
        self.precision = precision or ScreenPrecision.choose(self.device)
        norms = row_norms(units)  # [q]
        self.screened = np.flatnonzero(np.isfinite(norms) & (norms > 0))  # [s]
        screened_units = np.ascontiguousarray(units[self.screened])  # [s, dim] float32
        self.rounded = torch.from_numpy(screened_units).to(self.precision.dtype)  # [s, dim]
        shift = self.rounded.double() - torch.from_numpy(screened_units).double()
        self.query_error = torch.linalg.vector_norm(shift, dim=1).numpy()  # [s] e_q
        self.query_norms = norms[self.screened]  # [s] |u|
        self.rounded_on_device = None if self.device is None else self.rounded.to(self.device)  # [s, dim]
        self.bound_held = True
        self.keep = keep
        # Reused by every chunk, so no chunk leaves freed copies in the allocator: one
        # (directions, screen) pair per slot, two so a chunk can be screened while the
        # previous one's scores are still read (TopK.add_chunks).
        self._slots = [[torch.empty(0, dtype=self.precision.dtype), torch.empty(0, dtype=self.precision.dtype)] for _ in range(SLOTS)]
        s = len(self.screened)
        self.kept_ids = np.full((s, keep), -1, dtype=np.int64)  # [s, keep]
        self.kept_scores = np.full((s, keep), -np.inf, dtype=np.float32)  # [s, keep] screen scores
        self.kept_slack = np.zeros(s)  # [s]: the largest E of the chunks

    def _buffers(self, n: int, dim: int, slot: int) -> tuple[Any, Any]:
        """(directions [n, dim], screen [s, n]) views of ``slot``'s reused buffers, grown when needed."""
        import torch

        s = len(self.screened)
        buffers = self._slots[slot]
        if buffers[0].numel() < n * dim:
            buffers[0] = torch.empty(n * dim, dtype=self.precision.dtype)
        if buffers[1].numel() < s * n:
            buffers[1] = torch.empty(s * n, dtype=self.precision.dtype)
        return buffers[0][: n * dim].view(n, dim), buffers[1][: s * n].view(s, n)

    def slack(self, row_residual: float, dim: int) -> np.ndarray:
        """E [s] of the bound for a chunk whose largest row residual is ``row_residual`` (module docstring)."""
        f = row_residual + SCALING
        e, u = self.query_error, self.query_norms
        gamma = dim * FLOAT32_UNIT / (1 - dim * FLOAT32_UNIT)
        slack = e * (1 + f) + u * f + gamma * (u + e) * (1 + f) + TINY
        return slack * (1 + 1e-12)  # the float64 rounding of the terms above

    def scores(self, rows: np.ndarray, norms: np.ndarray, exact: dict[int, np.ndarray], slot: int = 0) -> tuple[Any, np.ndarray]:
        """(screen scores torch [s, n], E [s]) of a chunk of rows [n, dim] with float64 ``norms`` [n],
        in ``slot``'s buffers (valid until that slot is screened into again)."""
        import torch

        inverse, _ = inverse_norms(norms)
        directions, screen = self._buffers(len(rows), rows.shape[1], slot)  # [n, dim], [s, n]
        residual = rounded_directions(rows, inverse, self.precision, directions, exact)
        if self.rounded_on_device is None:
            torch.matmul(self.rounded, directions.T, out=screen)
        else:
            screen.copy_(self.rounded_on_device @ directions.to(self.device).T)
        return screen, self.slack(residual, rows.shape[1])

    def keep_best(self, screen: Any, start: int, slack: np.ndarray) -> None:
        """Merge this chunk's screen scores (torch [s, n]) into each query's ``keep`` best.

        Only a score above a query's lowest kept one can enter, and a list with room needs
        no more than the chunk's ``keep`` best; once the lists are full few enter (about
        keep / chunks seen, per query). Those are gathered first and one partition runs over
        the kept scores and them (numpy's partition is four times cheaper here than
        torch.topk). A score equal to the lowest kept one may stay out: every row left out
        still has a score of at most the lowest kept.
        """
        from pipeline.core.knn_kernels import screen_hits

        lowest = self.kept_scores.min(axis=1)  # [s]; -inf while a list has room
        # Kept scores are screen values, exact in float32: a score above the lowest is one at
        # or above its float32 successor (none above +inf).
        floor = np.where(lowest < np.inf, np.nextafter(lowest, np.float32(np.inf)), np.nan).astype(np.float32)  # [s]
        room = np.flatnonzero(np.isneginf(lowest))
        width = screen.shape[1]
        if len(room) and width > self.keep:
            import torch

            rows = screen if len(room) == len(lowest) else screen[torch.from_numpy(room)]
            kth = np.partition(rows.float().numpy(), width - self.keep, axis=1)[:, width - self.keep]  # [r] the chunk's keep-th best
            floor[room] = np.where(np.isnan(kth), floor[room], np.maximum(kth, floor[room]))
        query, column, scores = screen_hits(_score_bits(screen), floor)  # [m] each, by query
        np.maximum(self.kept_slack, slack, out=self.kept_slack)
        if not len(query):
            return
        rank = np.arange(len(query)) - np.searchsorted(query, query)  # place among its query's entries
        new_scores = np.full((len(lowest), int(rank.max()) + 1), -np.inf, dtype=np.float32)  # [s, entries]
        new_ids = np.full(new_scores.shape, -1, dtype=np.int64)
        new_scores[query, rank] = scores
        new_ids[query, rank] = column + start
        pool_scores = np.concatenate([self.kept_scores, new_scores], axis=1)  # [s, keep + entries]
        best = np.argpartition(-pool_scores, self.keep - 1, axis=1)[:, : self.keep]  # [s, keep]
        ids = np.concatenate([self.kept_ids, new_ids], axis=1)
        self.kept_scores = np.take_along_axis(pool_scores, best, axis=1)
        self.kept_ids = np.where(self.kept_scores > -np.inf, np.take_along_axis(ids, best, axis=1), -1)

    def candidates(self, screen: Any, slack: np.ndarray, best: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """([m] screened query, [m] column, [m] screen score) of the pairs whose score plus the
        bound reaches L_q; ``best`` [s, k] holds each query's best exact cosines so far (-inf unfilled)."""
        from pipeline.core.knn_kernels import screen_hits

        lower = self._lower(screen, slack, best)  # [s] L_q
        threshold = self._score_threshold(lower - slack)  # [s]
        # Excluded rows (-inf) are left out even while L_q is -inf.
        return screen_hits(_score_bits(screen), threshold)

    def _lower(self, screen: Any, slack: np.ndarray, best: np.ndarray) -> np.ndarray:
        """float64 [s] L_q: the k-th best of the exact cosines kept (``best`` [s, k]) and
        of this chunk's screen scores minus their bound; each is a cosine some distinct row
        reaches, so k rows do.

        Once every query has k exact cosines, they alone give L_q: a chunk's own best rows
        would raise it a little, but finding them costs more than scoring the few extra
        rows that pass without them.
        """
        import torch

        k = best.shape[1]
        if np.all(best[:, -1] > -np.inf):
            return best[:, -1].copy()
        take = min(k, screen.shape[1])
        top = torch.topk(screen, take, dim=1).values.double().numpy()  # [s, take]
        with np.errstate(invalid="ignore"):
            reached = top - self.precision.out * np.abs(top) - slack[:, None]  # -inf stays -inf
        merged = np.concatenate([best, reached], axis=1)  # [s, k + take]
        return -np.partition(-merged, k - 1, axis=1)[:, k - 1]

    def _score_threshold(self, target: np.ndarray) -> np.ndarray:
        """float32 [s]: the lowest screen score s with s + c |s| >= ``target`` [s], rounded down."""
        c = self.precision.out
        with np.errstate(invalid="ignore"):
            threshold = np.where(target >= 0, target / (1 + c), target / (1 - c))
        threshold = threshold - np.abs(threshold) * 1e-12
        rounded = threshold.astype(np.float32)
        return np.where(rounded > threshold, np.nextafter(rounded, np.float32(-np.inf)), rounded)

    def check(self, approx: np.ndarray, exact: np.ndarray, slack: np.ndarray) -> None:
        """Note a pair whose screen score lies outside its bound (1e-9 for the float64 score's own error)."""
        allowed = slack + self.precision.out * np.abs(approx.astype(np.float64)) + 1e-9
        if len(exact) and not np.all(np.abs(approx - exact) <= allowed):
            self.bound_held = False
