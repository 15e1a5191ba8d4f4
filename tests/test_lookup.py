"""lookup: padded batches marked by a mask, pooling, and the frozen nn.Embedding from Parquet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, processors

from pipeline.core.errors import DissectError
from pipeline.lookup import PADDING_ID, batch_lookup, load_embedding_layer, pool, word_vectors
from pipeline.core.parquet import read_vectors, vector_array, write_table
from pipeline.tokenizers.load import tokenizer_from_json

ROOT = Path(__file__).resolve().parent.parent

# A BPE vocabulary without pre-tokenizer, so a space is an ordinary character:
# "Hello" -> [12], " Hello" -> [13], "Banana" -> B a n a n a -> B an an a -> Ban an a -> [Ban, ana].
PIECES = ["[BOS]", "H", "e", "l", "o", " ", "B", "a", "n", "He", "ll", "llo", "Hello", " Hello", "an", "Ban", "ana"]
MERGES = [("H", "e"), ("l", "l"), ("ll", "o"), ("He", "llo"), (" ", "Hello"), ("a", "n"), ("B", "an"), ("an", "a")]
HELLO, SPACE_HELLO, SPACE, BAN, ANA, BOS = 12, 13, 5, 15, 16, 0


def hand_tokenizer() -> Tokenizer:
    """The BPE above, adding [BOS] (id 0) in front of every sequence when asked for special tokens."""
    tok = Tokenizer(models.BPE({piece: index for index, piece in enumerate(PIECES)}, MERGES))
    tok.add_special_tokens([AddedToken("[BOS]", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS)])
    return tok


def hand_matrix() -> np.ndarray:
    matrix = (np.arange(len(PIECES) * 4, dtype=np.float32) * 0.25 - 3).reshape(-1, 4)  # [17, 4], distinct rows
    matrix[HELLO] = [0.5, -2.0, 2.0, 1.0]  # |-2| == |2|: a tie for the top dimension
    return matrix


def test_the_hand_tokenizer_splits_as_designed():
    tok = hand_tokenizer()
    assert tok.encode("Banana", add_special_tokens=False).ids == [BAN, ANA]
    assert tok.encode(" Hello").ids == [BOS, SPACE_HELLO]


def test_padding_is_marked_by_the_mask_not_by_a_token_id():
    matrix = hand_matrix()
    vectors, mask, token_ids = batch_lookup(matrix, hand_tokenizer(), ["Hello", " Banana", "", "Banana"])
    assert vectors.shape == (4, 3, 4) and vectors.dtype == np.float32
    assert mask.tolist() == [[True, False, False], [True, True, True], [False, False, False], [True, True, False]]
    assert token_ids.tolist() == [[HELLO, -1, -1], [SPACE, BAN, ANA], [-1, -1, -1], [BAN, ANA, -1]]
    assert token_ids.dtype == np.int64 and PADDING_ID == -1
    assert np.array_equal(vectors[mask], matrix[token_ids[mask]])
    assert not vectors[~mask].any()  # padded positions are zeros


def test_special_tokens_only_when_asked_and_id_0_is_real_then():
    matrix = hand_matrix()
    vectors, mask, token_ids = batch_lookup(matrix, hand_tokenizer(), ["Hello", "Banana"], add_special_tokens=True)
    assert token_ids.tolist() == [[BOS, HELLO, -1], [BOS, BAN, ANA]]
    assert mask[:, 0].all()  # token id 0 here is BOS, a real token, and the mask says so
    assert np.array_equal(vectors[0, 0], matrix[BOS])


def test_empty_batch_has_the_right_shape():
    vectors, mask, token_ids = batch_lookup(hand_matrix(), hand_tokenizer(), [])
    assert vectors.shape == (0, 0, 4) and mask.shape == (0, 0) and token_ids.shape == (0, 0)


def test_token_outside_the_matrix_names_the_text():
    with pytest.raises(DissectError, match="' Hello' encodes to token id 13, outside the embedding's 13 rows"):
        batch_lookup(hand_matrix()[:13], hand_tokenizer(), ["Hello", " Hello"])


def test_pooling_mean_first_last():
    vectors = np.array([[[1, 2], [3, 6], [0, 0]], [[5, 5], [0, 0], [0, 0]]], dtype=np.float32)  # [2, 3, 2]
    mask = np.array([[True, True, False], [True, False, False]])
    assert pool(vectors, mask, "mean").tolist() == [[2, 4], [5, 5]]
    assert pool(vectors, mask, "first").tolist() == [[1, 2], [5, 5]]
    assert pool(vectors, mask, "last").tolist() == [[3, 6], [5, 5]]
    with pytest.raises(DissectError, match="pooling 'max' is unknown; use one of mean, first, last"):
        pool(vectors, mask, "max")


def test_word_vectors_pool_the_pieces_of_a_split_word():
    matrix = hand_matrix()
    hello, banana = word_vectors(matrix, hand_tokenizer(), ["Hello", "Banana"], "mean")
    assert hello.token_ids == [HELLO] and np.array_equal(hello.vector, matrix[HELLO])
    assert banana.token_ids == [BAN, ANA]
    assert np.array_equal(banana.vector, ((matrix[BAN].astype(np.float64) + matrix[ANA]) / 2).astype(np.float32))
    with pytest.raises(DissectError, match="'xyz' encodes to no tokens at all"):
        word_vectors(matrix, hand_tokenizer(), ["Hello", "xyz"])


def write_embeddings(path: Path, matrix: np.ndarray, token_ids: np.ndarray | None = None, row_group_size: int = 7) -> Path:
    ids = np.arange(len(matrix), dtype=np.int32) if token_ids is None else token_ids
    table = pa.table({"token_id": pa.array(ids), "token": pa.array([f"t{i}" for i in ids]), "vector": vector_array(matrix)})
    write_table(path, table, {"stage": "extract", "model": "test", "matrix_sha256": "0" * 64}, row_group_size=row_group_size)
    return path


@pytest.mark.parametrize("row_group_size", [7, 1000])  # several Arrow chunks, or one read-only buffer
def test_embedding_layer_is_frozen_and_returns_the_parquet_rows(tmp_path, row_group_size):
    matrix = np.random.default_rng(3).normal(size=(20, 5)).astype(np.float32)  # [vocab, dim]
    layer = load_embedding_layer(write_embeddings(tmp_path / "embeddings.parquet", matrix, row_group_size=row_group_size))
    assert isinstance(layer, torch.nn.Embedding) and not layer.weight.requires_grad
    assert (layer.num_embeddings, layer.embedding_dim) == (20, 5) and layer.weight.dtype == torch.float32
    ids = torch.tensor([[3, 0, 19], [7, 7, 1]])
    assert np.array_equal(layer(ids).numpy(), matrix[ids.numpy()])
    assert layer.weight.numpy().flags.writeable


def test_embedding_layer_refuses_rows_out_of_id_order(tmp_path):
    path = write_embeddings(tmp_path / "embeddings.parquet", np.zeros((3, 2), np.float32), np.array([0, 2, 1], np.int32))
    with pytest.raises(DissectError, match="not in token-id order"):
        load_embedding_layer(path)


def test_on_llama_small_hello_is_row_9906_whichever_way_it_is_looked_up(llama_small_artifacts):
    embeddings = llama_small_artifacts / "embeddings.parquet"
    _, matrix = read_vectors(embeddings)
    tok = tokenizer_from_json(llama_small_artifacts / "tokenizer.json")
    vectors, mask, token_ids = batch_lookup(matrix, tok, ["Hello", "Hello world, how are you?"], add_special_tokens=True)
    assert token_ids[0, :2].tolist() == [128000, 9906] and mask[0].sum() == 2
    layer = load_embedding_layer(embeddings)
    with torch.no_grad():
        out = layer(torch.from_numpy(np.where(mask, token_ids, 0))).numpy()  # [batch, seq, dim]
    assert np.array_equal(out[mask], vectors[mask])
    assert np.array_equal(layer.weight[9906].numpy(), matrix[9906])


def test_stages_without_torch_do_not_import_it():
    code = "import sys, pipeline.stages.stats, pipeline.stages.words, pipeline.lookup; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
