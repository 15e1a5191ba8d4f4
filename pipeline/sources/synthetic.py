"""Synthetic Meta-format Llama checkpoints (``consolidated.NN.pth`` + ``params.json``).

The real Llama 3.2 1B weights are gated, so this writes a stand-in with the same tensor
names, shapes, dtype, file layout and size, filled with seeded random values that look
roughly like trained weights. It lets the pipeline run at real scale (2.47 GB, 128,256
rows) and lets tests run on a tiny model of the same family.

Values are a pure function of ``(seed, tensor name, shape)``: every tensor has its own
generator, so a tensor does not depend on which other tensors are drawn, the shard count,
or the number of CPU threads, and ``torch.save`` output is byte-identical across runs.

A checkpoint series (a ``step``) stands in for the checkpoints of one training run:
step ``s`` is step 0's embedding plus ``s`` independent small noise steps, and a planted
set of tokens (:func:`planted_movers`, a pure function of the seed and the vocabulary
size) each jumps to a new direction at its own step. Every step is made on its own from
``(seed, step)``, so the versions of a series can be generated on different machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.errors import run_stage
from pipeline.core.determinism import row_norms
from pipeline.core.errors import DissectError
from pipeline.core.hashing import file_sha256
from pipeline.core.io import write_bytes_atomic
from pipeline.core.progress import progress_bar

EmbeddingSplit = Literal["vocab", "dim"]

EMBEDDING = "tok_embeddings.weight"
PARAMS_FILE = "params.json"
DTYPE = torch.bfloat16

# Row norms of a trained embedding are not all alike: they are skewed, with a long tail
# of large rows. A log-normal per-row gain (median 1, 90% of rows within 0.56..1.78)
# gives that shape, which a plain Gaussian table (all norms ~equal) lacks.
ROW_NORM_LOG_SIGMA = 0.35
# Trained RMSNorm gains start at 1 and drift; keep them near it so they stay plausible.
NORM_GAIN_STD = 0.05
# Rows of the embedding drawn per float32 block: bounds the float32 scratch (here 64 MB)
# whatever the vocabulary size, instead of a float32 copy of the whole table.
BLOCK_ELEMENTS = 1 << 24

# Meta's model-parallel layout: ColumnParallelLinear splits the output features (dim 0),
# RowParallelLinear the input features (dim 1).
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


@dataclass(frozen=True)
class LlamaLayout:
    """The hyper-parameters of a Llama 3 model, as in Meta's ``params.json``."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim_multiplier: float
    multiple_of: int
    norm_eps: float
    rope_theta: float
    use_scaled_rope: bool

    def __post_init__(self) -> None:
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
            if getattr(self, field) < 1:
                raise DissectError(f"layout {field}={getattr(self, field)} must be a positive integer")
        if self.dim % self.n_heads:
            raise DissectError(f"layout dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise DissectError(
                f"layout n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )

    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def hidden_dim(self) -> int:
        """The feed-forward width, by Meta's ``FeedForward`` formula (Llama 3.2 1B: 8192)."""
        hidden = int(2 * (4 * self.dim) / 3)
        hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape, in the order Meta's ``Transformer`` registers them.

        The output projection is tied to the embedding in Llama 3.2 1B/3B, so the
        checkpoint holds no ``output.weight``.
        """
        kv_dim = self.n_kv_heads * self.head_dim()
        hidden = self.hidden_dim()
        shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (self.vocab_size, self.dim)}
        for i in range(self.n_layers):
            layer = f"layers.{i}"
            shapes[f"{layer}.attention.wq.weight"] = (self.dim, self.dim)
            shapes[f"{layer}.attention.wk.weight"] = (kv_dim, self.dim)
            shapes[f"{layer}.attention.wv.weight"] = (kv_dim, self.dim)
            shapes[f"{layer}.attention.wo.weight"] = (self.dim, self.dim)
            shapes[f"{layer}.feed_forward.w1.weight"] = (hidden, self.dim)
            shapes[f"{layer}.feed_forward.w2.weight"] = (self.dim, hidden)
            shapes[f"{layer}.feed_forward.w3.weight"] = (hidden, self.dim)
            shapes[f"{layer}.attention_norm.weight"] = (self.dim,)
            shapes[f"{layer}.ffn_norm.weight"] = (self.dim,)
        shapes["norm.weight"] = (self.dim,)
        return shapes

    def param_count(self) -> int:
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())


LLAMA_3_2_1B = LlamaLayout(
    dim=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    vocab_size=128256,
    ffn_dim_multiplier=1.5,
    multiple_of=256,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
)


def small_layout(vocab_size: int = 128256, dim: int = 64, n_layers: int = 2) -> LlamaLayout:
    """A tiny model of the Llama 3.2 family.

    The vocabulary stays at 128,256 by default so the real Llama 3 tokenizer fits it.
    Eight query heads over two key/value heads keep 1B's 4:1 grouped-query ratio and
    allow two-way sharding; ``dim`` must therefore be a multiple of 8.
    """
    return dataclasses.replace(
        LLAMA_3_2_1B, vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=8, n_kv_heads=2
    )


def params_json(layout: LlamaLayout) -> dict[str, int | float | bool]:
    """The content of Meta's ``params.json`` for ``layout``, keys in Meta's order."""
    return {
        "dim": layout.dim,
        "n_layers": layout.n_layers,
        "n_heads": layout.n_heads,
        "n_kv_heads": layout.n_kv_heads,
        "vocab_size": layout.vocab_size,
        "ffn_dim_multiplier": layout.ffn_dim_multiplier,
        "multiple_of": layout.multiple_of,
        "norm_eps": layout.norm_eps,
        "rope_theta": layout.rope_theta,
        "use_scaled_rope": layout.use_scaled_rope,
    }


def shard_name(index: int) -> str:
    return f"consolidated.{index:02d}.pth"


# --- values -------------------------------------------------------------------------------


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed for one tensor, so each tensor is independent of the others."""
    # sha256 rather than hash(): Python salts str hashes per process.
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def embedding_values(vocab_size: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Rows ~ N(0, 1/dim) times a log-normal gain: row norms ~1 with a trained-like spread."""
    row_gain = torch.empty(vocab_size).normal_(0.0, ROW_NORM_LOG_SIGMA, generator=generator)  # [vocab]
    row_gain.exp_().mul_(dim**-0.5)
    table = torch.empty(vocab_size, dim, dtype=DTYPE)  # [vocab, dim]
    rows_per_block = max(1, BLOCK_ELEMENTS // dim)
    scratch = torch.empty(min(rows_per_block, vocab_size), dim)  # [rows, dim] float32
    for start in range(0, vocab_size, rows_per_block):
        stop = min(start + rows_per_block, vocab_size)
        block = scratch[: stop - start].normal_(generator=generator)
        # Scale in float32 and round to bf16 once.
        block.mul_(row_gain[start:stop, None])
        table[start:stop].copy_(block)
    return table


def linear_values(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1/in_features): the variance-preserving scale trained projections sit near."""
    weight = torch.empty(out_features, in_features, dtype=DTYPE)  # [out, in]
    # Drawn straight into bf16: no float32 copy of the largest matrices.
    return weight.normal_(0.0, in_features**-0.5, generator=generator)


def norm_values(dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(dim, dtype=DTYPE).normal_(1.0, NORM_GAIN_STD, generator=generator)  # [dim]


# --- a checkpoint series -------------------------------------------------------------------

# Each step moves every row by noise of this size relative to its norm (cosine to the step
# before about 1 - STEP_NOISE**2 / 2 = 0.9998), so ordinary tokens drift but never jump.
STEP_NOISE = 0.02
PLANTED_MOVERS = 10
# Steps at which the planted movers jump: mover i at step 1 + i % MOVER_STEPS.
MOVER_STEPS = 5
# A mover keeps this much of its old direction (cosine to the step before about 0.3).
MOVER_KEEP = 0.3
# Movers are drawn from ids at or above this fraction of the vocabulary, past the special
# and placeholder tokens that vocabularies put first.
MOVER_LOW_ID_FRACTION = 0.05


def planted_movers(vocab_size: int, seed: int) -> dict[int, int]:
    """The tokens a series plants: token id -> the step at which it jumps (1..MOVER_STEPS)."""
    rng = np.random.default_rng(tensor_seed(seed, "series:movers"))
    low = int(vocab_size * MOVER_LOW_ID_FRACTION)
    ids = rng.permutation(vocab_size - low)[:PLANTED_MOVERS] + low
    return {int(token): 1 + i % MOVER_STEPS for i, token in enumerate(ids)}


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / row_norms(rows)[:, None]


def series_embedding(vocab_size: int, dim: int, seed: int, step: int) -> torch.Tensor:
    """The embedding [vocab, dim] bf16 of ``step`` of the series.

    Drawn and computed in float64 by numpy's own loops (its generator, elementwise
    arithmetic, :func:`pipeline.core.determinism.row_norms`, libm's exp), never by a
    vectorised kernel picked for the CPU, so every machine writes the same bytes: the series
    is part of the default run, whose outputs are checked byte for byte.
    """
    rng = np.random.default_rng(tensor_seed(seed, "series:embedding"))
    gains = np.array([math.exp(g) for g in rng.normal(0.0, ROW_NORM_LOG_SIGMA, vocab_size)]) * dim**-0.5  # [vocab]
    table = rng.standard_normal((vocab_size, dim)) * gains[:, None]  # [vocab, dim] float64
    movers = planted_movers(vocab_size, seed)
    for s in range(1, step + 1):
        rng = np.random.default_rng(tensor_seed(seed, f"series:step:{s}"))
        noise = rng.standard_normal((vocab_size, dim))  # [vocab, dim]
        table += noise * (row_norms(table) * (STEP_NOISE * dim**-0.5))[:, None]
        jumping = np.array(sorted(token for token, at in movers.items() if at == s), np.int64)
        if len(jumping):
            old = table[jumping]  # [movers, dim]
            direction = MOVER_KEEP * _unit(old) + (1 - MOVER_KEEP**2) ** 0.5 * _unit(rng.standard_normal((len(jumping), dim)))
            table[jumping] = _unit(direction) * row_norms(old)[:, None]
    return torch.from_numpy(table.astype(np.float32)).to(DTYPE)


def make_tensor(name: str, shape: tuple[int, ...], seed: int, step: int | None = None) -> torch.Tensor:
    if name == EMBEDDING and step is not None:
        return series_embedding(shape[0], shape[1], seed, step)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    if name == EMBEDDING:
        return embedding_values(shape[0], shape[1], generator)
    if len(shape) == 1:
        return norm_values(shape[0], generator)
    return linear_values(shape[0], shape[1], generator)


def iter_tensors(layout: LlamaLayout, seed: int, step: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Each full (unsharded) tensor in Meta's order, made one at a time."""
    for name, shape in layout.tensor_shapes().items():
        yield name, make_tensor(name, shape, seed, step)


# --- model-parallel shards ----------------------------------------------------------------


def split_axis(name: str, embedding_split: EmbeddingSplit = "vocab") -> int | None:
    """The axis Meta's model-parallel layers split ``name`` along; None if replicated.

    Llama 3's VocabParallelEmbedding splits the vocabulary; Llama 2's ParallelEmbedding
    split the model dimension.
    """
    if name == EMBEDDING:
        return 0 if embedding_split == "vocab" else 1
    if any(f".{module}.weight" in name for module in COLUMN_PARALLEL):
        return 0
    if any(f".{module}.weight" in name for module in ROW_PARALLEL):
        return 1
    return None


def check_shardable(layout: LlamaLayout, n_shards: int, embedding_split: EmbeddingSplit) -> None:
    if embedding_split not in ("vocab", "dim"):
        raise DissectError(f"embedding_split={embedding_split!r}: use 'vocab' or 'dim'")
    if n_shards < 1:
        raise DissectError(f"n_shards={n_shards}: use 1 or more shards")
    # Each shard runs whole attention heads; n_heads is a multiple of n_kv_heads, so
    # checking n_kv_heads covers both.
    if layout.n_kv_heads % n_shards:
        raise DissectError(
            f"{n_shards} shards do not divide n_kv_heads={layout.n_kv_heads}; "
            f"use a shard count that divides {layout.n_kv_heads}"
        )
    for name, shape in layout.tensor_shapes().items():
        axis = split_axis(name, embedding_split)
        if axis is not None and shape[axis] % n_shards:
            raise DissectError(
                f"{n_shards} shards do not divide {name} axis {axis} ({shape[axis]}); "
                "use a shard count that divides it"
            )


def split_tensor(tensor: torch.Tensor, axis: int | None, n_shards: int) -> list[torch.Tensor]:
    """The ``n_shards`` pieces of ``tensor`` (replicas if ``axis`` is None)."""
    if n_shards == 1:
        return [tensor]
    if axis is None:
        return [tensor] * n_shards
    # clone(): torch.save writes a view's whole storage, which would put the full
    # tensor in every shard file.
    return [piece.clone() for piece in torch.chunk(tensor, n_shards, dim=axis)]


def build_shards(
    layout: LlamaLayout,
    seed: int,
    n_shards: int,
    embedding_split: EmbeddingSplit,
    bar: tqdm,
    step: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in iter_tensors(layout, seed, step):
        pieces = split_tensor(tensor, split_axis(name, embedding_split), n_shards)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece
        bar.update(1)
    return shards


# --- files --------------------------------------------------------------------------------


def check_no_stale_shards(out_dir: Path, n_shards: int) -> None:
    """Refuse to leave shards of an earlier, wider run next to the new ones."""
    expected = {shard_name(i) for i in range(n_shards)}
    stale = sorted(p.name for p in out_dir.glob("consolidated.*.pth") if p.name not in expected)
    if stale:
        raise DissectError(
            f"{out_dir} already holds {', '.join(stale)} from another checkpoint; "
            "remove them or write to an empty directory"
        )


def save_shard(tensors: dict[str, torch.Tensor], staging: Path, target: Path) -> None:
    # Staged under the final file name: torch.save names the archive's root folder
    # after the file, so a temporary name would change the bytes.
    staged = staging / target.name
    torch.save(tensors, staged)
    os.replace(staged, target)


def write_params(out_dir: Path, layout: LlamaLayout) -> Path:
    path = out_dir / PARAMS_FILE
    # Meta's key order, not sorted: the file reads like the one it stands in for.
    write_bytes_atomic(path, (json.dumps(params_json(layout)) + "\n").encode("utf-8"))
    return path


def bar_or_silence(progress: bool, total: int, desc: str, unit: str) -> tqdm:
    return progress_bar(total, desc, unit) if progress else tqdm(total=total, disable=True)


def write_meta_checkpoint(
    out_dir: Path,
    layout: LlamaLayout,
    seed: int,
    n_shards: int = 1,
    progress: bool = True,
    embedding_split: EmbeddingSplit = "vocab",
    step: int | None = None,
) -> list[Path]:
    """Write ``consolidated.00.pth`` .. ``consolidated.NN.pth`` and ``params.json``.

    ``step`` (0, 1, ...) writes that step of the checkpoint series (see
    :func:`series_embedding`); only the embedding differs between steps.

    Returns the shard paths in order. Tensors are bf16. With ``n_shards > 1`` the
    tensors are split as Meta's model-parallel layers hold them (see :func:`split_axis`);
    concatenating the shards gives the single-file tensors exactly. Peak memory is about
    the checkpoint's size plus one tensor.
    """
    out_dir = Path(out_dir)
    check_shardable(layout, n_shards, embedding_split)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_no_stale_shards(out_dir, n_shards)

    with bar_or_silence(progress, len(layout.tensor_shapes()), "generating", "tensor") as bar:
        shards = build_shards(layout, seed, n_shards, embedding_split, bar, step)

    paths = [out_dir / shard_name(i) for i in range(n_shards)]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".synthetic-") as staging:
        with bar_or_silence(progress, n_shards, "writing", "file") as bar:
            for path in paths:
                # pop(): release each shard's memory as soon as it is on disk.
                save_shard(shards.pop(0), Path(staging), path)
                bar.update(1)
    write_params(out_dir, layout)
    return paths


def checkpoint_sha256(path: Path | str) -> str:
    return file_sha256(path)


# --- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sources.synthetic",
        description="Write a synthetic Meta-format Llama 3.2 1B checkpoint (consolidated.NN.pth + params.json).",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--small", action="store_true", help="tiny layout of the same family, for tests")
    parser.add_argument("--shards", type=int, default=1, help="model-parallel shard count (default 1)")
    parser.add_argument(
        "--embedding-split",
        choices=("vocab", "dim"),
        default="vocab",
        help="shard the embedding along the vocabulary (Llama 3) or the model dimension (Llama 2)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    layout = small_layout() if args.small else LLAMA_3_2_1B
    paths = write_meta_checkpoint(
        args.out_dir,
        layout,
        seed=args.seed,
        n_shards=args.shards,
        progress=not args.quiet,
        embedding_split=args.embedding_split,
    )
    for path in [*paths, args.out_dir / PARAMS_FILE]:
        print(path)


if __name__ == "__main__":
    run_stage(main)
