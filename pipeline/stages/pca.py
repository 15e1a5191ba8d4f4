"""pca stage: the embedding matrix seen from its two main directions.

Reads ``artifacts/<name>/embeddings.parquet`` and ``words.parquet`` and writes beside them:

* ``pca.parquet``: ``token_id int32``, ``token string``, ``pc1``, ``pc2`` (float32): every
  token's coordinates on the first two principal axes of the whole vocabulary;
* ``pca_variance.json`` (DVC plot data): ``[{"component": i, "explained_variance_ratio":
  r, "cumulative": c}]`` for the first ``pca.n_components`` components (all of them when
  the model has fewer dimensions);
* ``pca_words.parquet``: ``word``, ``variant``, ``vocab_pc1``, ``vocab_pc2`` (the word
  vector in the whole-vocabulary basis above) and ``words_pc1``, ``words_pc2`` (in a PCA
  fitted on the word vectors alone, as the tutorial did; only their relative layout means
  anything there), float32;
* ``figures/pca_words.png``: the words, labelled, in both bases side by side;
  ``figures/pca_vocab.png``: the whole vocabulary as a density (hexbin) with the words
  marked (both drawn by ``pipeline.report.figures``).

The fit is exact and deterministic, so the same matrix gives the same bytes every run:
the rows are centred on their mean and the dim x dim covariance is accumulated block by
block (X^T X of the centred rows as a symmetric rank-k update, multiplied in float32 and
summed in float64, never more than one block in memory); the leading
``pca.n_components`` eigenpairs come from LAPACK's MRRR eigensolver, or from block
Lanczos on matrices 4096 or more wide (:mod:`pipeline.core.pca` has the details). That
costs one pass over the matrix plus a solve of size dim, far less than an SVD of the whole
[vocab, dim] matrix. The fit needs no seed. Fits on fewer rows than dimensions (the word
vectors) use an SVD of the centred rows instead, which is exact and cheaper there.

An axis's sign is arbitrary in any PCA; here each component is flipped so that its
largest-|loading| element is positive (the first such element if several tie).
Explained variance uses n - 1 (as scikit-learn); a matrix whose rows are all equal has
no variance to explain, and its ratios are 0 rather than NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.cli import Stage
from pipeline.core.errors import DissectError, run_stage
from pipeline.core.hashing import file_sha256
from pipeline.report.figures import PcaVocab, PcaWords, pca_vocab_figure, pca_words_figure
from pipeline.core.io import output_set, write_json_atomic
from pipeline.core.params import model_paths
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import as_params, from_section, setting, whole_number
from pipeline.core.parquet import derived_provenance, read_matrix, write_table
from pipeline.core.pca import Pca, fit_pca
from pipeline.core.words import WordVectors, read_words

STAGE = "pca"


@dataclass(frozen=True)
class PcaSettings:
    # Components whose explained variance is reported (the fit itself is exact, no seed needed).
    n_components: int = setting(50, whole_number(1, 100_000))


RATIO_DECIMALS = 4  # explained variance ratios are published to 0.0001 (0.01% of the variance)


def variance_plot_data(pca: Pca, n_components: int) -> list[dict[str, float | int]]:
    """DVC plot data: explained variance ratio of the first ``n_components`` axes, and its running sum.

    Both are rounded to RATIO_DECIMALS decimals (the running sum of the unrounded ratios):
    beyond the refined axes an eigenvalue of the float32 covariance carries ~1e-9 of
    kernel-dependent noise, far below that grid.
    """
    raw = pca.explained_variance_ratio[:n_components]
    ratios = [round(float(r), RATIO_DECIMALS) for r in raw]
    cumulative = [round(float(c), RATIO_DECIMALS) for c in np.cumsum(raw)]
    return [
        {"component": i + 1, "explained_variance_ratio": r, "cumulative": c}
        for i, (r, c) in enumerate(zip(ratios, cumulative))
    ]


def pca_table(coordinates: np.ndarray, tokens: pa.Array) -> pa.Table:
    """token_id, token, pc1, pc2 for every row; ``coordinates`` [vocab, 2]."""
    return pa.table(
        {
            "token_id": pa.array(np.arange(len(coordinates), dtype=np.int32)),
            "token": tokens,
            "pc1": pa.array(coordinates[:, 0].astype(np.float32)),
            "pc2": pa.array(coordinates[:, 1].astype(np.float32)),
        }
    )


def pca_words_table(words: WordVectors, vocab_xy: np.ndarray, words_xy: np.ndarray) -> pa.Table:
    """Each word variant in the whole-vocabulary basis and in the words-only basis; [w, 2] each."""
    return pa.table(
        {
            "word": words.word,
            "variant": words.variant,
            "vocab_pc1": pa.array(vocab_xy[:, 0].astype(np.float32)),
            "vocab_pc2": pa.array(vocab_xy[:, 1].astype(np.float32)),
            "words_pc1": pa.array(words_xy[:, 0].astype(np.float32)),
            "words_pc2": pa.array(words_xy[:, 1].astype(np.float32)),
        }
    )


# --------------------------------------------------------------------------------------
# Stage


def run(paths: ModelPaths, settings: PcaSettings) -> None:
    """The stage on one model."""
    matrix = read_matrix(paths.embeddings)  # [vocab, dim]
    if matrix.shape[1] < 2:
        raise DissectError(f"{paths.embeddings} has {matrix.shape[1]} dimension; a 2-D projection needs at least 2")
    words = read_words(paths.words, matrix.shape[1], matrix.shape[0], paths.name)
    tokens = pq.read_table(paths.embeddings, columns=["token"]).column("token").combine_chunks()

    vocab_pca = fit_pca(matrix, n_components=max(2, settings.n_components), show_progress=True)
    coordinates = vocab_pca.transform(matrix)  # [vocab, 2]
    vocab_xy = vocab_pca.transform(words.vectors)  # [w, 2]
    words_pca = fit_pca(words.vectors, n_components=2)
    words_xy = words_pca.transform(words.vectors)  # [w, 2]

    provenance = derived_provenance(STAGE, paths.name, paths.embeddings, {"pca": as_params(settings)})
    with output_set():
        write_table(paths.pca, pca_table(coordinates, tokens), provenance)
        write_json_atomic(paths.pca_variance, variance_plot_data(vocab_pca, settings.n_components))
        provenance["words"] = {"path": str(paths.words), "sha256": file_sha256(paths.words)}
        write_table(paths.pca_words, pca_words_table(words, vocab_xy, words_xy), provenance)
        variants, ratios = words.variant.to_pylist(), vocab_pca.explained_variance_ratio
        pca_words_figure(PcaWords(paths.name, variants, vocab_xy, ratios, words_xy, words_pca.explained_variance_ratio),
                         paths.figures / "pca_words.png")
        pca_vocab_figure(PcaVocab(paths.name, coordinates, ratios, variants, vocab_xy, tokens.to_pylist()),
                         paths.figures / "pca_vocab.png")


main = Stage(STAGE, "MODEL", model_paths, from_section(PcaSettings, STAGE), run).main


if __name__ == "__main__":
    run_stage(main)
