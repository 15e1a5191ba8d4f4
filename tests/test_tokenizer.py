"""Tokenizer loading and vocabulary description, checked against the real packaged tokenizers.

References: the Llama 3.2 package's own tokenizer.json and tiktoken's encoder for the
tiktoken conversion; hand-built vocabularies for the piece decoding rules.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import gguf
import pytest
import tiktoken
import tokenizers
from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from pipeline.core.errors import DissectError
from pipeline.tokenizers.load import (
    TokenPiece,
    detect_tokenizer,
    load_tokenizer,
    special_token_ids,
    token_pieces,
    tokenizer_from_gguf,
    tokenizer_from_json,
    tokenizer_from_tiktoken,
    word_token_ids,
)

# Meta's Llama 3 split pattern, written out here so the reference does not share our constant.
META_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

HAND_PICKED = [
    "Hello", " Hello", "Hello world", "hello, World!", "HELLO", "I'm", "you'LL", "they'RE here", "don't",
    "The quick brown fox jumps over the lazy dog.", "embedding", " embeddings", "tokenization",
    "1", "12", "123", "1234", "12345678901234567890", "3.14159", "-42", "1,000,000", "0x1F600", "2024-06-30",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }", "if __name__ == '__main__':",
    "SELECT * FROM t WHERE id = 7;", '{"key": [1, 2, 3]}', "<div class=\"a\">text</div>", "a\\xaa\\xff",
    "日本語のテキスト", "中文分词测试", "한국어 문장", "Привет, мир", "Ελληνικά", "مرحبا بالعالم", "שלום", "हिन्दी",
    "naïve café résumé", "Zürich straße", "🙂", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷 flag", "…", "—", "“quoted”", "\u00a0nbsp",
    " ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "a  b", "a   b", "a\t\tb", "line1\r\nline2", "trailing   ",
    "   leading", "x\n\n\ny", "    indented code", "<|begin_of_text|>", "<|eot_id|>",
]

FRAGMENTS = HAND_PICKED + ["the", " of", " 42", "ß", "é", "\u200b", "🤖", "::", "==", "  ", "\n", "ing", "Ω", "١٢٣"]


def varied_strings() -> list[str]:
    """The hand-picked strings plus seeded mixtures of them: a few hundred in all."""
    rng = random.Random(20240630)
    mixed = ["".join(rng.choices(FRAGMENTS, k=rng.randint(2, 6))) for _ in range(300)]
    return HAND_PICKED + mixed


# ---------------------------------------------------------------------------------------
# Real tokenizers, loaded once per module (loading takes up to ~2 s each)


@pytest.fixture(scope="module")
def llama3_tiktoken(llama3_tokenizer_dir) -> tokenizers.Tokenizer:
    return tokenizer_from_tiktoken(llama3_tokenizer_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def llama3_json(llama3_tokenizer_dir) -> tokenizers.Tokenizer:
    return tokenizer_from_json(llama3_tokenizer_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> tokenizers.Tokenizer:
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def minilm(minilm_dir) -> tokenizers.Tokenizer:
    return tokenizer_from_json(minilm_dir / "tokenizer.json")


# ---------------------------------------------------------------------------------------
# Llama 3: tiktoken tokenizer.model converted to a tokenizers BPE


def test_llama3_hello(llama3_tiktoken):
    assert llama3_tiktoken.encode("Hello").ids == [128000, 9906]  # BOS prepended, like the HF tokenizer
    assert word_token_ids(llama3_tiktoken, "Hello") == [9906]
    (space_hello,) = word_token_ids(llama3_tiktoken, " Hello")
    assert space_hello != 9906
    assert token_pieces(llama3_tiktoken)[space_hello] == TokenPiece(" Hello")


def test_llama3_vocab_and_special_tokens(llama3_tiktoken, llama3_json):
    assert llama3_tiktoken.get_vocab_size(with_added_tokens=True) == 128256
    specials = special_token_ids(llama3_tiktoken)
    assert specials == frozenset(range(128000, 128256))
    assert llama3_tiktoken.token_to_id("<|begin_of_text|>") == 128000
    assert llama3_tiktoken.token_to_id("<|end_of_text|>") == 128001
    assert llama3_tiktoken.token_to_id("<|eot_id|>") == 128009
    # Every special token has the name the package's tokenizer.json gives that id.
    for index in range(128000, 128256):
        assert llama3_tiktoken.id_to_token(index) == llama3_json.id_to_token(index), index


def test_llama3_conversion_rebuilds_the_packaged_vocab_and_merges(llama3_tiktoken, llama3_tokenizer_dir):
    reference = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    ours = json.loads(llama3_tiktoken.to_str())["model"]
    assert ours["vocab"] == reference["vocab"]
    as_pairs = [merge.split(" ") if isinstance(merge, str) else merge for merge in reference["merges"]]
    assert ours["merges"] == as_pairs  # same merges in the same priority order


def test_llama3_conversion_matches_tokenizer_json(llama3_tiktoken, llama3_json):
    strings = varied_strings()
    assert len(strings) >= 300
    ours = llama3_tiktoken.encode_batch(strings, add_special_tokens=True)
    reference = llama3_json.encode_batch(strings, add_special_tokens=True)
    for text, got, want in zip(strings, ours, reference):
        assert got.ids == want.ids, text
        assert llama3_tiktoken.decode(got.ids, skip_special_tokens=False).endswith(text)


def test_llama3_conversion_matches_tiktoken(llama3_tiktoken, llama3_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file, write no cache copy
    ranks = load_tiktoken_bpe(str(llama3_tokenizer_dir / "tokenizer.model"))
    names = [llama3_tiktoken.id_to_token(index) for index in range(len(ranks), len(ranks) + 256)]
    encoding = tiktoken.Encoding(
        name="llama3",
        pat_str=META_LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={name: len(ranks) + offset for offset, name in enumerate(names)},
    )
    strings = [text for text in varied_strings() if "<|" not in text]  # tiktoken would treat those as text
    for text in strings:
        assert word_token_ids(llama3_tiktoken, text) == encoding.encode(text, disallowed_special=()), text
    assert encoding.encode("<|eot_id|>", allowed_special="all") == [128009]


def test_llama3_json_and_tiktoken_describe_the_same_pieces(llama3_tiktoken, llama3_json):
    from_tiktoken = token_pieces(llama3_tiktoken)
    from_json = token_pieces(llama3_json)
    assert len(from_tiktoken) == 128256
    # The packaged tokenizer.json adds one token (<|image|>, 128256) after Meta's 256.
    assert from_json[:128256] == from_tiktoken
    assert from_json[128256] == TokenPiece("<|image|>")


def test_token_pieces_are_unique_on_llama3(llama3_tiktoken):
    pieces = token_pieces(llama3_tiktoken)
    assert len({piece.text for piece in pieces}) == len(pieces)
    assert pieces[9906] == TokenPiece("Hello")
    assert pieces[128000] == TokenPiece("<|begin_of_text|>")
    partial = [piece for piece in pieces if piece.raw is not None]
    assert partial  # Llama 3 has pieces that are parts of multi-byte characters
    for piece in partial:
        with pytest.raises(UnicodeDecodeError):
            piece.raw.decode("utf-8")
    # Real pieces that read like Python escapes stay as they are, distinct from lone bytes.
    assert TokenPiece("\\xaa") in pieces and TokenPiece("<0xAA>", b"\xaa") in pieces


# ---------------------------------------------------------------------------------------
# GGUF: SmolLM2-135M-Instruct (gpt2 byte-level BPE, pre "smollm")


def test_smollm2_gguf_vocab(smollm2):
    assert smollm2.get_vocab_size(with_added_tokens=True) == 49152
    # The file marks ids 0..16 as CONTROL: <|endoftext|>, <|im_start|> (BOS 1), <|im_end|> (EOS 2), ...
    assert special_token_ids(smollm2) == frozenset(range(17))
    pieces = token_pieces(smollm2)
    assert pieces[0] == TokenPiece("<|endoftext|>")
    assert pieces[1] == TokenPiece("<|im_start|>")
    assert pieces[2] == TokenPiece("<|im_end|>")
    assert len({piece.text for piece in pieces}) == len(pieces)


def test_smollm2_gguf_encodes_words(smollm2):
    pieces = token_pieces(smollm2)
    (hello,) = word_token_ids(smollm2, "Hello")
    (space_hello,) = word_token_ids(smollm2, " Hello")
    assert pieces[hello] == TokenPiece("Hello")
    assert pieces[space_hello] == TokenPiece(" Hello")
    # tokenizer.ggml.add_bos_token is false: nothing is added around the text.
    assert smollm2.encode("Hello").ids == [hello]
    # The "smollm" pre-tokenizer splits every digit on its own.
    assert [pieces[index].text for index in word_token_ids(smollm2, "2024")] == ["2", "0", "2", "4"]
    # Control tokens in the text are matched whole.
    assert word_token_ids(smollm2, "<|im_start|>user") == [1, *word_token_ids(smollm2, "user")]


@pytest.mark.parametrize(
    "text",
    ["Hello world", "The year 2024 had 366 days.", "naïve café 日本語 🙂", "def f(x):\n    return x\n", "  spaced  out  "],
)
def test_smollm2_gguf_round_trip(smollm2, text):
    ids = word_token_ids(smollm2, text)
    assert smollm2.decode(ids) == text
    # The pieces' bytes, put back together, are the text again.
    pieces = token_pieces(smollm2)
    assert b"".join(_piece_bytes(pieces[index]) for index in ids).decode("utf-8") == text


def _piece_bytes(piece: TokenPiece) -> bytes:
    return piece.raw if piece.raw is not None else piece.text.encode("utf-8")


@pytest.mark.parametrize("built", ["llama3_tiktoken", "smollm2"])
def test_built_tokenizers_survive_saving_as_tokenizer_json(built, request, tmp_path):
    """The extract stage saves the tokenizer as tokenizer.json; reloading it must change nothing."""
    tok = request.getfixturevalue(built)
    saved = tmp_path / "tokenizer.json"
    saved.write_text(tok.to_str(), encoding="utf-8")
    reloaded = tokenizer_from_json(saved)
    strings = varied_strings()[:120]
    assert [e.ids for e in reloaded.encode_batch(strings)] == [e.ids for e in tok.encode_batch(strings)]
    assert token_pieces(reloaded) == token_pieces(tok)
    assert special_token_ids(reloaded) == special_token_ids(tok)


# ---------------------------------------------------------------------------------------
# GGUF: hand-written files


def _write_gguf(path: Path, **keys) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    for method, value in keys.items():
        getattr(writer, f"add_{method}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _sentencepiece_gguf(path: Path) -> Path:
    """A tiny Llama 2 style vocabulary: <unk> <s> </s>, 256 byte pieces, then scored pieces."""
    normal = [("▁", -1.0), ("H", -2.0), ("e", -2.0), ("l", -2.0), ("o", -2.0), ("w", -2.0), ("r", -2.0), ("d", -2.0),
              ("ll", -3.0), ("He", -4.0), ("llo", -5.0), ("Hello", -6.0), ("▁Hello", -7.0)]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), *(piece for piece, _ in normal)]
    return _write_gguf(
        path,
        tokenizer_model="llama",
        token_list=tokens,
        token_scores=[0.0] * 259 + [score for _, score in normal],
        token_types=[2, 3, 3] + [6] * 256 + [1] * len(normal),
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
        add_bos_token=True,
        add_space_prefix=True,
    )


def test_sentencepiece_gguf(tmp_path):
    tok = tokenizer_from_gguf(_sentencepiece_gguf(tmp_path / "spm.gguf"))
    hello = tok.token_to_id("▁Hello")
    assert hello == 259 + 12
    assert tok.encode("Hello").ids == [1, hello]  # BOS, then the space-prefixed word
    assert word_token_ids(tok, "Hello") == [hello]
    # "▁world" is not a piece: single characters; "é" is not either: its UTF-8 bytes C3 A9.
    assert tok.encode("Hello world", add_special_tokens=False).tokens == ["▁Hello", "▁", "w", "o", "r", "l", "d"]
    assert word_token_ids(tok, "é") == [tok.token_to_id("▁"), 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode("Hello world é").ids) == "Hello world é"
    assert special_token_ids(tok) == frozenset({0, 1, 2})
    pieces = token_pieces(tok)
    assert pieces[hello] == TokenPiece(" Hello")
    assert pieces[3 + 0x41] == TokenPiece("A")  # <0x41> is a whole character
    assert pieces[3 + 0xC3] == TokenPiece("<0xC3>", b"\xc3")  # half of one
    assert pieces[1] == TokenPiece("<s>")


def test_gguf_user_defined_tokens_are_added_but_not_special(tmp_path):
    tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "<tool>"]
    path = _write_gguf(
        tmp_path / "bpe.gguf",
        tokenizer_model="gpt2",
        tokenizer_pre="default",
        token_list=tokens,
        token_types=[3, 1, 1, 1, 1, 4],
        token_merges=["a b"],
        bos_token_id=0,
        add_bos_token=True,
    )
    tok = tokenizer_from_gguf(path)
    assert special_token_ids(tok) == frozenset({0})
    assert tok.encode("ab<tool>").ids == [0, 3, 5]
    assert word_token_ids(tok, "ab<tool>") == [3, 5]
    assert [piece.text for piece in token_pieces(tok)] == ["<|endoftext|>", "a", "b", "ab", " ", "<tool>"]


# ---------------------------------------------------------------------------------------
# Piece decoding on hand-built vocabularies


def _byte_level_tokenizer(vocab: list[str]) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE({token: index for index, token in enumerate(vocab)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_byte_level_pieces():
    # GPT-2 byte table: Ġ = space (0x20), Ċ = newline (0x0A), Ģ = 0x80, â = 0xE2, ¦ = 0xA6.
    tok = _byte_level_tokenizer(["ĠHello", "Ċ", "âĢ¦", "Ģ", "âĢ", "\\x80", "Ġâ"])
    assert token_pieces(tok) == [
        TokenPiece(" Hello"),
        TokenPiece("\n"),
        TokenPiece("…"),  # E2 80 A6
        TokenPiece("<0x80>", b"\x80"),  # a lone continuation byte
        TokenPiece("<0xE2><0x80>", b"\xe2\x80"),  # the first two bytes of "…"
        TokenPiece("\\x80"),  # literal backslash text, distinct from the byte above
        TokenPiece(" <0xE2>", b" \xe2"),
    ]


def test_byte_level_added_tokens_read_as_written():
    tok = _byte_level_tokenizer(["a", "Ġb"])
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.add_tokens([AddedToken(" ĠNot byte-level", special=False)])
    assert [piece.text for piece in token_pieces(tok)] == ["a", " b", "<|endoftext|>", " ĠNot byte-level"]
    assert special_token_ids(tok) == frozenset({2})


def test_sentencepiece_pieces():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xE2>": 4, "▁Hello": 5, "▁▁": 6, "lo": 7}
    tok = tokenizers.Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    assert [(piece.text, piece.raw) for piece in token_pieces(tok)] == [
        ("<unk>", None), ("<s>", None), ("</s>", None), ("\n", None), ("<0xE2>", b"\xe2"), (" Hello", None), ("  ", None), ("lo", None),
    ]
    assert special_token_ids(tok) == frozenset({0, 1, 2})


def test_byte_fallback_vocabulary_has_kinds_and_unique_keys():
    """``"\\n"`` is both a piece and the byte <0x0A>: the texts repeat, the keys do not."""
    from builders import sentencepiece_tokenizer

    pieces = token_pieces(sentencepiece_tokenizer())
    by_key = {piece.key: piece for piece in pieces}
    assert len(by_key) == len(pieces)  # unique
    assert [piece.text for piece in pieces].count("\n") == 2
    assert (by_key["\n"].kind, by_key["<0x0A>"].kind, by_key["<0x0A>"].text) == ("normal", "byte", "\n")
    assert by_key["<0xE2>"].kind == "byte" and by_key["<0xE2>"].raw == b"\xe2"
    assert by_key["<s>"].kind == "special" and by_key["▁Hello".replace("▁", " ")].kind == "normal"
    assert [piece.kind for piece in pieces if "unused" in piece.text] == ["unused"] * 3


@pytest.mark.parametrize("name", ["<unused0>", "[unused12]", "<|reserved_special_token_250|>", "<extra_id_99>", "<|extra_3|>",
                                  "<reserved_7>"])
def test_placeholder_names_are_unused(name):
    from pipeline.tokenizers.load import UNUSED_NAME

    assert UNUSED_NAME.fullmatch(name)


@pytest.mark.parametrize("name", ["<|end_of_text|>", "unused", "<unused>", "[UNK]", "<|im_start|>", "reserved1"])
def test_other_names_are_not_unused(name):
    from pipeline.tokenizers.load import UNUSED_NAME

    assert not UNUSED_NAME.fullmatch(name)


def test_keys_of_texts_that_still_repeat_get_the_id():
    from pipeline.tokenizers.load import token_keys

    assert token_keys(["a", "b", "a", "\n"], ["normal", "normal", "normal", "byte"], ["a", "b", "a2", "<0x0A>"]) == [
        "a", "b", "a<id:2>", "<0x0A>"]


def test_metaspace_unigram_pieces():
    tok = tokenizers.Tokenizer(models.Unigram([("<unk>", 0.0), ("▁the", -1.0), ("s", -2.0)], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    assert [piece.text for piece in token_pieces(tok)] == ["<unk>", " the", "s"]


# ---------------------------------------------------------------------------------------
# WordPiece: all-MiniLM-L6-v2


def test_minilm_wordpiece(minilm):
    pieces = token_pieces(minilm)
    assert len(pieces) == 30522
    assert pieces[minilm.token_to_id("##ing")] == TokenPiece("##ing")
    assert pieces[101] == TokenPiece("[CLS]")
    assert special_token_ids(minilm) == frozenset({0, 100, 101, 102, 103})  # PAD UNK CLS SEP MASK
    assert word_token_ids(minilm, "Hello") == [minilm.token_to_id("hello")]
    assert minilm.encode("Hello").ids == [101, minilm.token_to_id("hello"), 102]  # no padding to 128
    assert [pieces[index].text for index in word_token_ids(minilm, "embedding")] == ["em", "##bed", "##ding"]


def test_word_token_ids_drops_padding_of_a_tokenizer_loaded_elsewhere(minilm_dir):
    padded = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    assert padded.padding is not None  # the packaged file pads to 128
    assert word_token_ids(padded, "Hello") == [padded.token_to_id("hello")]


# ---------------------------------------------------------------------------------------
# Finding and dispatching


def test_detect_prefers_tokenizer_json(llama3_tokenizer_dir, minilm_dir):
    assert detect_tokenizer(llama3_tokenizer_dir) == ("tokenizer.json", llama3_tokenizer_dir / "tokenizer.json")
    assert detect_tokenizer(minilm_dir) == ("tokenizer.json", minilm_dir / "tokenizer.json")


def test_detect_tiktoken_model(llama3_tokenizer_dir, tmp_path):
    shutil.copy(llama3_tokenizer_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    assert detect_tokenizer(tmp_path) == ("tiktoken", tmp_path / "tokenizer.model")


def test_detect_nothing(tmp_path):
    assert detect_tokenizer(tmp_path) is None


def test_load_tokenizer_dispatches(llama3_tokenizer_dir, minilm_dir, tmp_path):
    assert load_tokenizer("tokenizer.json", minilm_dir / "tokenizer.json").get_vocab_size() == 30522
    tok = load_tokenizer("gguf", _sentencepiece_gguf(tmp_path / "spm.gguf"))
    assert tok.token_to_id("▁Hello") == 271
    unknown = r"unknown tokenizer kind 'sentencepiece'; use one of tokenizer.json, tiktoken, gguf"
    with pytest.raises(DissectError, match=unknown):
        load_tokenizer("sentencepiece", minilm_dir / "tokenizer.json")


# ---------------------------------------------------------------------------------------
# User errors


def _sentencepiece_protobuf() -> bytes:
    """The start of a real SentencePiece ModelProto: pieces <unk>, <s>, </s> (text, score, type)."""
    body = b""
    for text, kind in ((b"<unk>", 2), (b"<s>", 3), (b"</s>", 3)):
        piece = b"\x0a" + bytes([len(text)]) + text + b"\x15\x00\x00\x00\x00" + b"\x18" + bytes([kind])
        body += b"\x0a" + bytes([len(piece)]) + piece
    return body


@pytest.mark.parametrize("kind", ["tokenizer.json", "tiktoken", "gguf"])
def test_missing_file(kind, tmp_path):
    with pytest.raises(DissectError, match=r"tokenizer file .*nope does not exist; .*`tokenizer"):
        load_tokenizer(kind, tmp_path / "nope")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DissectError, match=r"is not a file; point `tokenizer` at a Hugging Face tokenizer.json"):
        tokenizer_from_json(tmp_path)


def test_invalid_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": ')
    with pytest.raises(DissectError, match=r"tokenizer.json is not valid JSON: .*; point `tokenizer` at a Hugging Face"):
        tokenizer_from_json(path)


def test_png_named_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde")
    with pytest.raises(DissectError, match=r"is not valid JSON \(not UTF-8 text\)"):
        tokenizer_from_json(path)
    with pytest.raises(DissectError, match=r"is not valid JSON"):
        load_tokenizer(*detect_tokenizer(tmp_path))


def test_json_that_is_not_a_tokenizer(minilm_dir, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"architectures": ["BertModel"], "hidden_size": 384}')
    with pytest.raises(DissectError, match=r"config.json is not a Hugging Face tokenizer.json \(.+\)"):
        tokenizer_from_json(path)


def test_sentencepiece_model_is_not_tiktoken(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(_sentencepiece_protobuf())
    wrong_format = r"is a SentencePiece model, not a tiktoken tokenizer.model; convert it to a tokenizer.json"
    with pytest.raises(DissectError, match=wrong_format):
        detect_tokenizer(tmp_path)
    with pytest.raises(DissectError, match=r"is a SentencePiece model"):
        tokenizer_from_tiktoken(tmp_path / "tokenizer.model")


def test_other_binary_is_not_tiktoken(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x00\x01\x02garbage")
    with pytest.raises(DissectError, match=r"is not a tiktoken tokenizer.model \(expected lines 'base64token rank'\)"):
        tokenizer_from_tiktoken(path)


def test_damaged_tiktoken_line(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"QQ== 0\nQg== 1\nnot*base64 2\n")
    with pytest.raises(DissectError, match=r"line 3 of .* is not 'base64token rank'"):
        tokenizer_from_tiktoken(path)


def test_tiktoken_ranks_with_a_gap(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"QQ== 0\nQg== 5\n")  # "A" 0, "B" 5: ids 1..4 would be missing
    with pytest.raises(DissectError, match=r"ranks in .* are not 0..1 once each"):
        tokenizer_from_tiktoken(path)


def test_tiktoken_that_is_not_llama3(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"QQ== 0\nQg== 1\n")
    with pytest.raises(DissectError, match=r"has 2 tiktoken ranks, not Llama 3's 128000; .*tokenizer.json"):
        tokenizer_from_tiktoken(path)


def test_gguf_errors(tmp_path, minilm_dir):
    with pytest.raises(DissectError, match=r"is not a GGUF file \(no GGUF magic\); check the file"):
        tokenizer_from_gguf(minilm_dir / "tokenizer.json")
    bare = _write_gguf(tmp_path / "bare.gguf")
    with pytest.raises(DissectError, match=r"holds no tokenizer \(no tokenizer.ggml.model\); set `tokenizer:`"):
        tokenizer_from_gguf(bare)
    bert = _write_gguf(tmp_path / "bert.gguf", tokenizer_model="bert", token_list=["[PAD]", "a"])
    unsupported = r"holds a 'bert' tokenizer, which cannot be read from GGUF .*; set `tokenizer:` to the model's tokenizer.json"
    with pytest.raises(DissectError, match=unsupported):
        tokenizer_from_gguf(bert)
    twice = _write_gguf(tmp_path / "twice.gguf", tokenizer_model="gpt2", token_list=["a", "b", "a"])
    with pytest.raises(DissectError, match=r"lists the token 'a' at ids 0 and 2"):
        tokenizer_from_gguf(twice)
    bad_merge = _write_gguf(
        tmp_path / "merge.gguf", tokenizer_model="gpt2", token_list=["a", "b"], token_merges=["a c"]
    )
    with pytest.raises(DissectError, match=r"tokenizer metadata in .* is inconsistent"):
        tokenizer_from_gguf(bad_merge)
