"""Figure labels: legible (no two overlap, all inside the axes), shared by points on one spot,
and the vocabulary hexbin's densest cell named with a few of its tokens."""

from __future__ import annotations

import numpy as np

from pipeline.report.figures import (
    DENSEST_EXAMPLES,
    PcaVocab,
    densest_cell_tokens,
    densest_label,
    label_points,
    merge_coincident,
    new_figure,
    pca_vocab_figure,
    style,
)


def crowded_axes(points: np.ndarray):
    figure = new_figure(6, 4)
    ax = figure.subplots()
    ax.scatter(points[:, 0], points[:, 1])
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    return figure, ax


def test_labels_in_a_crowd_never_overlap_and_stay_inside_the_axes():
    rng = np.random.default_rng(0)
    points = rng.normal(scale=0.08, size=(14, 2))  # 14 words in a small patch, as SmolLM2's "Hello" ... "Science"
    labels = [f'"word {i}"' for i in range(14)]
    with style():
        figure, ax = crowded_axes(points)
        taken = label_points(figure, ax, points, labels, boxed=True)
        frame = ax.get_window_extent(figure.canvas.get_renderer())
    boxes = taken[len(points):]  # the markers come first
    assert len(boxes) == len(labels)
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, i
        assert not any(box.overlaps(other) for other in boxes[:i]), i
    texts = [text.get_text() for text in ax.texts if text.get_text()]
    assert texts == labels  # every label drawn, once


def test_points_on_one_spot_share_one_label():
    # MiniLM lowercases and drops the space: "Hello" and " Hello" are the same vector.
    points = np.array([[0.0, 0.0], [0.0, 0.0], [0.5, 0.5], [0.0, 1e-9]])
    with style():
        figure, ax = crowded_axes(points)
        figure.draw_without_rendering()
        kept, labels = merge_coincident(points, ['"Hello"', '" Hello"', '"Hi"', '"Hello"'], ax.transData)
    assert labels == ['"Hello", " Hello"', '"Hi"'] and kept.tolist() == [[0.0, 0.0], [0.5, 0.5]]


def test_densest_cell_is_named_with_its_tokens(tmp_path):
    rng = np.random.default_rng(1)
    spread = rng.uniform(-1, 1, size=(400, 2))
    cluster = np.full((30, 2), 0.4) + rng.normal(scale=1e-4, size=(30, 2))  # the unused tokens, all in one cell
    coordinates = np.concatenate([spread, cluster])
    tokens = [f"t{i}" for i in range(400)] + [f"<unused{i}>" for i in range(30)]
    ids = densest_cell_tokens(coordinates, np.array([0.4, 0.4]), 30, (-1.0, 1.0, -1.0, 1.0))
    assert ids.tolist() == list(range(400, 430))
    assert densest_label(30, ids, tokens) == 'densest cell: 30 tokens, e.g. "<unused0>", "<unused1>", "<unused2>", ...'
    assert DENSEST_EXAMPLES == 3 and densest_label(2, ids[:2], None) == "densest cell: 2 tokens"

    path = tmp_path / "vocab.png"
    words = np.array([[0.0, 0.0], [0.1, 0.0]])
    pca_vocab_figure(PcaVocab("toy", coordinates, np.array([0.3, 0.2]), ["Hello", " Hello"], words, tokens), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
