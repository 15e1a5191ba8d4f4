"""The synthetic Meta-format checkpoint: real Llama 3.2 1B layout, deterministic bytes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import DissectError
from pipeline.sources.synthetic import (
    LLAMA_3_2_1B,
    EmbeddingSplit,
    LlamaLayout,
    checkpoint_sha256,
    main,
    params_json,
    small_layout,
    split_axis,
    write_meta_checkpoint,
)

SMALL = small_layout()


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, mmap=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small layout written once as one file, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("single")
    write_meta_checkpoint(out, SMALL, seed=7, progress=False)
    return out


# --- layout -------------------------------------------------------------------------------


def test_llama_3_2_1b_has_the_published_parameter_count() -> None:
    # Published Llama 3.2 1B: dim 2048, 16 layers, 32 heads of 64, 8 KV heads, FFN 8192,
    # vocabulary 128256, output tied to the embedding.
    embedding = 128256 * 2048
    attention = 2048 * 2048 + 2 * (8 * 64) * 2048 + 2048 * 2048  # wq, wk+wv, wo
    feed_forward = 3 * 8192 * 2048  # w1, w2, w3
    norms = 2 * 2048  # attention_norm, ffn_norm
    expected = embedding + 16 * (attention + feed_forward + norms) + 2048  # + final norm
    assert expected == 1_235_814_400

    shapes = LLAMA_3_2_1B.tensor_shapes()
    assert sum(math.prod(shape) for shape in shapes.values()) == expected
    assert LLAMA_3_2_1B.param_count() == expected
    # bf16: the real consolidated.00.pth is ~2.47 GB.
    assert 2.47e9 < expected * 2 < 2.48e9


def test_llama_3_2_1b_shapes_and_order() -> None:
    shapes = LLAMA_3_2_1B.tensor_shapes()
    assert len(shapes) == 2 + 16 * 9
    assert "output.weight" not in shapes
    names = list(shapes)
    assert names[0] == "tok_embeddings.weight" and names[-1] == "norm.weight"
    assert names[1:10] == [
        "layers.0.attention.wq.weight",
        "layers.0.attention.wk.weight",
        "layers.0.attention.wv.weight",
        "layers.0.attention.wo.weight",
        "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
    ]
    assert shapes["tok_embeddings.weight"] == (128256, 2048)
    assert shapes["layers.15.attention.wq.weight"] == (2048, 2048)
    assert shapes["layers.15.attention.wk.weight"] == (512, 2048)
    assert shapes["layers.15.attention.wv.weight"] == (512, 2048)
    assert shapes["layers.15.attention.wo.weight"] == (2048, 2048)
    assert shapes["layers.15.feed_forward.w1.weight"] == (8192, 2048)
    assert shapes["layers.15.feed_forward.w3.weight"] == (8192, 2048)
    assert shapes["layers.15.feed_forward.w2.weight"] == (2048, 8192)
    assert shapes["layers.15.ffn_norm.weight"] == (2048,)
    assert "layers.16.ffn_norm.weight" not in shapes


@pytest.mark.parametrize(
    ("dim", "multiplier", "multiple_of", "published"),
    [
        (2048, 1.5, 256, 8192),  # Llama 3.2 1B
        (3072, 1.0, 256, 8192),  # Llama 3.2 3B
        (4096, 1.3, 1024, 14336),  # Llama 3.1 8B
        (8192, 1.3, 4096, 28672),  # Llama 3.1 70B
    ],
)
def test_hidden_dim_matches_published_ffn_widths(
    dim: int, multiplier: float, multiple_of: int, published: int
) -> None:
    layout = LlamaLayout(
        dim=dim,
        n_layers=1,
        n_heads=dim // 128,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=multiplier,
        multiple_of=multiple_of,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
    )
    assert layout.hidden_dim() == published


def test_llama_3_2_1b_hidden_dim() -> None:
    assert LLAMA_3_2_1B.hidden_dim() == 8192


def test_params_json_of_1b_is_metas() -> None:
    assert params_json(LLAMA_3_2_1B) == {
        "dim": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.5,
        "multiple_of": 256,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }


def test_layout_rejects_heads_that_do_not_divide() -> None:
    with pytest.raises(DissectError, match="n_heads"):
        small_layout(dim=60)


# --- written files ------------------------------------------------------------------------


def test_small_checkpoint_reads_back(single: Path) -> None:
    state = load(single / "consolidated.00.pth")
    shapes = SMALL.tensor_shapes()
    assert list(state) == list(shapes)
    for name, tensor in state.items():
        assert tuple(tensor.shape) == shapes[name], name
        assert tensor.dtype == torch.bfloat16, name
        assert torch.isfinite(tensor.float()).all(), name
    assert state["tok_embeddings.weight"].shape == (128256, 64)
    assert json.loads((single / "params.json").read_text()) == params_json(SMALL)
    assert sorted(p.name for p in single.iterdir()) == ["consolidated.00.pth", "params.json"]


def test_embedding_looks_trained(single: Path) -> None:
    table = load(single / "consolidated.00.pth")["tok_embeddings.weight"].float()  # [vocab, dim]
    norms = table.norm(dim=1)
    assert 0.9 < norms.median().item() < 1.1
    # Row norms spread log-normally, not all equal as in a plain Gaussian draw.
    assert 0.25 < norms.log().std().item() < 0.5
    assert abs(table.mean().item()) < 1e-3
    # No two rows the same: a row-indexing slip would repeat blocks.
    assert torch.unique(table[:, :8], dim=0).shape[0] == table.shape[0]


def test_norm_gains_sit_near_one(single: Path) -> None:
    state = load(single / "consolidated.00.pth")
    gains = state["norm.weight"].float()
    assert 0.9 < gains.mean().item() < 1.1
    assert gains.std().item() > 0


# --- determinism --------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(tmp_path: Path, single: Path) -> None:
    again = tmp_path / "again"
    write_meta_checkpoint(again, SMALL, seed=7, progress=False)
    for name in ("consolidated.00.pth", "params.json"):
        assert checkpoint_sha256(again / name) == checkpoint_sha256(single / name), name


def test_bytes_do_not_depend_on_thread_count(tmp_path: Path, single: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_meta_checkpoint(tmp_path, SMALL, seed=7, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert checkpoint_sha256(tmp_path / "consolidated.00.pth") == checkpoint_sha256(
        single / "consolidated.00.pth"
    )


def test_different_seed_gives_different_values(tmp_path: Path, single: Path) -> None:
    write_meta_checkpoint(tmp_path, SMALL, seed=8, progress=False)
    ours, theirs = load(tmp_path / "consolidated.00.pth"), load(single / "consolidated.00.pth")
    assert list(ours) == list(theirs)
    for name in ("tok_embeddings.weight", "layers.1.feed_forward.w2.weight"):
        assert ours[name].shape == theirs[name].shape
        assert not torch.equal(ours[name], theirs[name]), name


def test_tensors_differ_from_each_other(single: Path) -> None:
    # Per-tensor seeds: same-shaped tensors in different layers must not repeat.
    state = load(single / "consolidated.00.pth")
    assert not torch.equal(state["layers.0.attention.wq.weight"], state["layers.1.attention.wq.weight"])
    assert not torch.equal(state["layers.0.attention.wq.weight"], state["layers.0.attention.wo.weight"])


# --- shards -------------------------------------------------------------------------------


@pytest.mark.parametrize(("embedding_split", "embedding_axis"), [("vocab", 0), ("dim", 1)])
def test_shards_concatenate_to_the_single_file(
    tmp_path: Path, single: Path, embedding_split: EmbeddingSplit, embedding_axis: int
) -> None:
    paths = write_meta_checkpoint(
        tmp_path, SMALL, seed=7, n_shards=2, progress=False, embedding_split=embedding_split
    )
    assert [p.name for p in paths] == ["consolidated.00.pth", "consolidated.01.pth"]
    full = load(single / "consolidated.00.pth")
    shards = [load(p) for p in paths]

    expected_axes = {
        "tok_embeddings.weight": embedding_axis,
        "layers.0.attention.wq.weight": 0,
        "layers.0.attention.wk.weight": 0,
        "layers.0.attention.wv.weight": 0,
        "layers.0.feed_forward.w1.weight": 0,
        "layers.0.feed_forward.w3.weight": 0,
        "layers.0.attention.wo.weight": 1,
        "layers.0.feed_forward.w2.weight": 1,
        "layers.0.attention_norm.weight": None,
        "layers.0.ffn_norm.weight": None,
        "norm.weight": None,
    }
    for name, axis in expected_axes.items():
        assert split_axis(name, embedding_split) == axis, name

    for name, tensor in full.items():
        pieces = [shard[name] for shard in shards]
        axis = split_axis(name, embedding_split)
        if axis is None:
            assert all(torch.equal(piece, tensor) for piece in pieces), name
        else:
            assert all(piece.shape[axis] * 2 == tensor.shape[axis] for piece in pieces), name
            assert torch.equal(torch.cat(pieces, dim=axis), tensor), name

    # Each shard holds only its slices, not the whole storage of the tensor it came from.
    shard_bytes = sum(p.stat().st_size for p in paths)
    single_bytes = (single / "consolidated.00.pth").stat().st_size
    replicated = 2 * SMALL.n_layers + 1
    assert shard_bytes < single_bytes + replicated * SMALL.dim * 2 + 100_000


def test_vocab_shard_k_holds_rows_k_times_v_over_n(tmp_path: Path, single: Path) -> None:
    paths = write_meta_checkpoint(tmp_path, SMALL, seed=7, n_shards=2, progress=False)
    table = load(single / "consolidated.00.pth")["tok_embeddings.weight"]
    rows = SMALL.vocab_size // 2
    assert torch.equal(load(paths[1])["tok_embeddings.weight"], table[rows:])


def test_shard_count_must_keep_whole_heads(tmp_path: Path) -> None:
    with pytest.raises(DissectError, match="n_kv_heads"):
        write_meta_checkpoint(tmp_path, SMALL, seed=0, n_shards=4, progress=False)
    assert not list(tmp_path.glob("*.pth"))


def test_refuses_to_mix_with_stale_shards(tmp_path: Path) -> None:
    write_meta_checkpoint(tmp_path, SMALL, seed=0, n_shards=2, progress=False)
    with pytest.raises(DissectError, match="consolidated.01.pth"):
        write_meta_checkpoint(tmp_path, SMALL, seed=0, n_shards=1, progress=False)


def test_leaves_no_staging_files(tmp_path: Path) -> None:
    write_meta_checkpoint(tmp_path, SMALL, seed=0, n_shards=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
    ]


# --- command line -------------------------------------------------------------------------


def test_cli_writes_the_small_layout(
    tmp_path: Path, single: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main([str(tmp_path), "--small", "--seed", "7", "--quiet"])
    assert checkpoint_sha256(tmp_path / "consolidated.00.pth") == checkpoint_sha256(
        single / "consolidated.00.pth"
    )
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "consolidated.00.pth"),
        str(tmp_path / "params.json"),
    ]


def test_cli_shards(tmp_path: Path) -> None:
    main([str(tmp_path), "--small", "--shards", "2", "--embedding-split", "dim", "--quiet"])
    shard = load(tmp_path / "consolidated.01.pth")
    assert shard["tok_embeddings.weight"].shape == (128256, 32)
