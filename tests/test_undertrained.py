"""undertrained stage: planted under-trained rows are recovered; reference sets; the tokenizer check; real models."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.core.errors import DissectError
from pipeline.core.paths import ModelPaths
from pipeline.core.settings import read_section
from pipeline.core.parquet import read_provenance
from pipeline.stages.undertrained import (
    RULE,
    choose_reference,
    encodes_to_self,
    flag,
    indicators,
    known_unused_rows,
    ranks,
    run,
    UndertrainedSettings,
)

VOCAB, DIM = 4000, 64


def planted_matrix(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matrix [VOCAB, DIM], reference rows, other planted rows).

    Trained rows: a strong shared offset and a dominant direction (as real embeddings have)
    plus spread. Under-trained rows: one shared initialisation plus a little noise.
    """
    rng = np.random.default_rng(seed)
    offset = rng.normal(size=DIM) * 0.6
    axis = rng.normal(size=DIM)
    matrix = offset + rng.normal(size=(VOCAB, 1)) * axis + rng.normal(size=(VOCAB, DIM))
    init = rng.normal(size=DIM) * 0.5
    planted = rng.choice(VOCAB, size=53, replace=False)
    matrix[planted] = init + offset + rng.normal(size=(53, DIM)) * 0.15
    return matrix.astype(np.float32), np.sort(planted[:13]), np.sort(planted[13:])


def test_planted_rows_are_all_recovered_with_few_false_alarms():
    matrix, reference, hidden = planted_matrix()
    ind = indicators(matrix, reference)
    eligible = np.ones(VOCAB, bool)
    flags, threshold = flag(ind.cos_dist_ref_centered, eligible, percentile=1.5)
    planted = np.union1d(reference, hidden)
    assert flags[planted].all()  # all 53 recovered
    assert flags.sum() == 60  # 1.5% of 4000: at most 7 false alarms ...
    rank = ranks(ind.cos_dist_ref_centered, eligible)
    assert set(np.flatnonzero((rank >= 1) & (rank <= 53))) == set(planted)  # ... and every planted row ranks first
    assert np.all(ind.cos_dist_ref_centered[hidden] < 0.2) and threshold > 0.2


def test_flag_excludes_rows_without_text():
    values = np.array([0.1, 0.0, 0.5, 0.9], np.float32)
    eligible = np.array([True, False, True, True])
    flags, threshold = flag(values, eligible, 34.0)
    assert flags.tolist() == [True, False, False, False]
    assert ranks(values, eligible).tolist() == [1, 0, 2, 3]


def test_known_unused_tokens_by_kind():
    tokens = ["<0xC0>", "<0xC1>", "<0xC3>", "<|reserved_special_token_7|>", "[unused3]", "hello", None, "<0xFF>", "<extra_id_0>"]
    raw = [b"\xc0", b"\xc1", b"\xc3", None, None, None, None, b"\xff", None]
    found = known_unused_rows(tokens, raw)
    assert found["unused_utf8_bytes"].tolist() == [0, 1, 7]
    assert found["placeholders"].tolist() == [3, 4, 8]


def test_reference_fallbacks_are_stated():
    tokens, raw = ["a", "b", "c", "d", None], [None] * 5
    norms = np.array([3.0, 1.0, 2.0, 0.5, 0.0])
    listed = choose_reference(read_section(UndertrainedSettings, {"reference_tokens": ["c", "not-here"]}, "undertrained"), tokens, raw, norms)
    assert listed.rows.tolist() == [2] and "reference_tokens" in listed.method
    smallest = choose_reference(read_section(UndertrainedSettings, {"fallback_rows": 2}, "undertrained"), tokens, raw, norms)
    assert smallest.rows.tolist() == [1, 3] and "smallest_norm" in smallest.method  # padding row 4 is not a token
    with pytest.raises(DissectError, match="not-here"):
        choose_reference(read_section(UndertrainedSettings, {"reference": "tokens", "reference_tokens": ["not-here"]}, "undertrained"), tokens, raw, norms)


@pytest.mark.parametrize("bad", [{"percentile": 0}, {"percentile": 100}, {"reference": "nope"}, {"reference": "tokens"},
                                 {"fallback_rows": 0}, {"reference_tokens": "abc"}])
def test_settings_mistakes_name_the_fix(bad):
    with pytest.raises(DissectError, match="undertrained"):
        read_section(UndertrainedSettings, bad, "undertrained")


def test_encodes_to_self_on_wordpiece(minilm_artifacts):
    from pipeline.tokenizers.load import tokenizer_from_json

    tok = tokenizer_from_json(minilm_artifacts / "tokenizer.json")
    vocab = tok.get_vocab()
    tokens = [None] * tok.get_vocab_size()
    for text in ("hello", "[unused0]", "##ing", "[CLS]"):
        tokens[vocab[text]] = text
    result = encodes_to_self(tok, tokens, [None] * len(tokens))
    assert result[vocab["hello"]] is True
    assert result[vocab["[unused0]"]] is False  # splits into "[", "unused", ...: never typed
    assert result[vocab["##ing"]] is None  # a continuation piece only occurs inside a word
    assert result[vocab["[CLS]"]] is True


def test_smollm2_end_to_end(smollm2_artifacts):
    metrics = run(ModelPaths.for_artifacts(smollm2_artifacts), read_section(UndertrainedSettings, {"percentile": 2.0, "reference_tokens": ["<0xF3>", "<0xF4>"], "top": 25}, "undertrained"))
    table = pq.read_table(smollm2_artifacts / "undertrained.parquet")
    assert table.column_names == ["token_id", "token", "l2_norm", "cos_dist_ref", "cos_dist_ref_centered", "is_reference",
                                  "is_special", "encodes_to_self", "flagged", "rank"]
    assert table.num_rows == 49152
    # SmolLM2's vocabulary has no byte token for 0xC0, 0xC1 or 0xF5-0xFF: the configured list is used.
    assert metrics["reference"]["count"] == 2 and "reference_tokens" in metrics["reference"]["method"]
    assert metrics["flagged"] == int(np.sum(table.column("flagged").to_numpy(zero_copy_only=False)))
    assert abs(metrics["flagged"] - 0.02 * 49152) <= 2
    strongest = [row["token"] for row in metrics["strongest"]]
    # Never-trained rows: SmolLM2's unused special tokens all kept one identical initial row.
    assert {"<jupyter_text>", "<issue_start>", "<empty_output>"} <= set(strongest)
    assert {" iprot", " biomark", "PeerV"} <= set(strongest[:10])
    provenance = read_provenance(smollm2_artifacts / "undertrained.parquet")
    assert provenance["rule"] == RULE and provenance["threshold"] == metrics["threshold_cos_dist_ref_centered"]
    assert json.loads((smollm2_artifacts / "undertrained.json").read_text())["flagged"] == metrics["flagged"]


def test_minilm_uses_bert_unused_placeholders(minilm_artifacts):
    metrics = run(ModelPaths.for_artifacts(minilm_artifacts), read_section(UndertrainedSettings, {"percentile": 2.0}, "undertrained"))
    assert metrics["reference"]["method"] == "auto (placeholders: 994)" and metrics["reference"]["count"] == 994
    assert metrics["reference"]["reason"].startswith("994 placeholder tokens named unused, reserved or extra (`[unused0]`")
    assert metrics["flagged"] == 611
    assert metrics["strongest"][0]["token"].startswith("[unused")


def test_auto_finds_unused_placeholders_of_a_sentencepiece_vocabulary(tmp_path):
    """<unusedN> placeholders (Gemma) and the never-occurring byte <0xF5> are the reference, said in a sentence."""
    from builders import sentencepiece_tokenizer
    from pipeline.tokenizers.load import token_pieces

    tok = sentencepiece_tokenizer(unused=5)
    pieces = token_pieces(tok)
    tokens, raw, kinds = [p.text for p in pieces], [p.raw for p in pieces], [p.kind for p in pieces]
    settings = read_section(UndertrainedSettings, {}, "undertrained")
    reference = choose_reference(settings, tokens, raw, np.ones(len(tokens)), kinds)
    assert [tokens[row] for row in reference.rows] == [f"<unused{i}>" for i in range(5)]  # <0xE2>, <0xF3> occur in UTF-8
    assert reference.method == "auto (placeholders: 5)"
    assert reference.reason == ("5 placeholder tokens named unused, reserved or extra (`<unused0>`, `<unused1>`, `<unused2>`, "
                                "… `<unused4>`), found by auto: tokens no training text produces.")
    # Without the kind column (older files) the names are matched all the same.
    assert choose_reference(settings, tokens, raw, np.ones(len(tokens))).rows.tolist() == reference.rows.tolist()


def test_model_config_sets_its_own_reference_tokens():
    from pipeline.stages.undertrained import read_settings

    model = {"format": "gguf", "source": {"path": "m.gguf"}, "undertrained": {"reference_tokens": ["<0xF3>"]}}
    params = {"models": {"m": model, "n": {**model, "undertrained": None}}, "undertrained": {"percentile": 1.0, "reference_tokens": ["x"]}}
    own = read_settings(params, "m")
    assert own.reference_tokens == ["<0xF3>"] and own.percentile == 1.0
    assert read_settings(params, "n").reference_tokens == ["x"]
    params["models"]["m"]["undertrained"] = {"reference_tokens": "<0xF3>"}
    with pytest.raises(DissectError, match=r"models\.m\.undertrained\.reference_tokens must be a list"):
        read_settings(params, "m")
