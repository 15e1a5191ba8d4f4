"""Load a model's tokenizer and describe its vocabulary.

Whatever file a tokenizer comes from (a Hugging Face ``tokenizer.json``, a Llama 3
``tokenizer.model`` in tiktoken format, or the metadata of a GGUF checkpoint), it becomes a
:class:`tokenizers.Tokenizer`, so every later stage encodes words and reads the vocabulary
through one interface. :func:`token_pieces` turns the vocabulary into readable text per id,
decoding each piece by its own scheme (byte-level BPE, SentencePiece, WordPiece).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, get_args

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from pipeline.core.errors import DissectError
from pipeline.formats.checks import JSONProblem, file_inside, is_whole, parse_json

TokenizerKind = Literal["tokenizer.json", "tiktoken", "gguf"]
TOKENIZER_KINDS: tuple[str, ...] = get_args(TokenizerKind)

JSON_FIX = "point `tokenizer` at a Hugging Face tokenizer.json"
TIKTOKEN_FIX = "point `tokenizer` at a Llama 3 tokenizer.model (tiktoken format) or a tokenizer.json"
GGUF_FIX = "set `tokenizer:` to the model's tokenizer.json instead"

# Llama 3's pre-tokenizer split, as in Meta's llama-models tokenizer.py (tiktoken's cl100k pattern).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3 reserves 256 ids after the BPE ranks. The names follow llama-models' Llama 3.1
# tokenizer.py, which is what the text models' (3.1, 3.2 1B/3B) tokenizer.json files carry;
# the later vision tokenizer inserts <|image|> at 128011 and shifts the reserved names by one.
LLAMA3_NUM_RANKS = 128000
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_NAMED_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
LLAMA3_BOS = "<|begin_of_text|>"

# llama.cpp's names for the Llama 3 pre-tokenizer in tokenizer.ggml.pre.
GGUF_LLAMA3_PRE = frozenset({"llama-bpe", "llama3", "llama-v3"})

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
GGUF_UNKNOWN, GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 2, 1, 3, 4, 5, 6

SENTENCEPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space

# What a row of the matrix is (embeddings.parquet's ``kind`` column):
#   normal   an ordinary piece of text;
#   byte     a byte-fallback piece (SentencePiece's <0x00>..<0xFF>: Llama 2, Gemma, Mistral);
#   special  a control token (BOS, EOS, [CLS], <|im_start|>, ...);
#   unused   a placeholder no text produces, named so: <unusedN>, [unusedN], <extra_id_N>,
#            <|reserved_special_token_N|>, <|extra_N|>, ... (see UNUSED_NAME);
#   padding  a row beyond the tokenizer, which no token uses.
TOKEN_KINDS = ("normal", "byte", "special", "unused", "padding")
# A placeholder's name: in <...>, <|...|> or [...], a word containing unused, reserved or
# extra, then a number.
UNUSED_NAME = re.compile(r"(?:<\|?|\[)[A-Za-z_]*?(?:unused|reserved|extra)[A-Za-z_]*?\d+\|?[>\]]", re.IGNORECASE)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by every byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


BYTES_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
# str.translate tables, so a whole vocabulary converts in C rather than char by char.
_BYTE_TO_BYTELEVEL = {byte: char for byte, char in BYTES_TO_UNICODE.items()}
_BYTELEVEL_TO_LATIN1: dict[int, int] = {ord(char): byte for byte, char in BYTES_TO_UNICODE.items()}
# Latin-1 characters that are not in the byte-level alphabet must not pass through as bytes:
# map them out of Latin-1 so encoding fails and the piece is kept as written.
_BYTELEVEL_TO_LATIN1.update({code: 0xFFFF for code in range(256) if code not in _BYTELEVEL_TO_LATIN1})


@dataclass(frozen=True)
class TokenPiece:
    """The readable text of one vocabulary entry.

    ``text`` is what the piece stands for (``" Hello"`` for byte-level ``"ĠHello"`` or
    SentencePiece ``"▁Hello"``; WordPiece ``"##ing"`` and special tokens as written).
    ``raw`` holds the piece's bytes when they are not valid UTF-8 on their own (half of a
    multi-byte character); ``text`` then spells each undecodable byte ``<0xNN>``, as
    SentencePiece names its byte pieces. Python's ``\\xNN`` escapes would not do: Llama 3
    has pieces that literally read ``\\xaa`` and ``\\xff``.

    ``kind`` is one of :data:`TOKEN_KINDS`; ``key`` is unique over the vocabulary
    (:func:`token_keys`), where ``text`` is not: a byte-fallback vocabulary has both the
    piece ``"\\n"`` and the byte ``<0x0A>``, whose text is also ``"\\n"``.
    """

    text: str
    raw: bytes | None = None
    # Set by token_pieces; a piece equals another with the same text and bytes.
    kind: str = field(default="normal", compare=False)
    key: str | None = field(default=None, compare=False)


# --------------------------------------------------------------------------------------
# Loading


def load_tokenizer(kind: str, path: Path) -> tokenizers.Tokenizer:
    """Load the tokenizer at ``path``, read as ``kind`` (one of :data:`TOKENIZER_KINDS`)."""
    loaders: dict[str, Callable[[Path], tokenizers.Tokenizer]] = {
        "tokenizer.json": tokenizer_from_json,
        "tiktoken": tokenizer_from_tiktoken,
        "gguf": tokenizer_from_gguf,
    }
    loader = loaders.get(kind)
    if loader is None:
        raise DissectError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(TOKENIZER_KINDS)}")
    return loader(Path(path))


def tokenizer_from_json(path: Path) -> tokenizers.Tokenizer:
    """A Hugging Face ``tokenizer.json``."""
    path = Path(path)
    _require_file(path, JSON_FIX)
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers reports every parse problem as a bare Exception
        raise _json_problem(path, error) from error
    return _for_description(tok)


def _json_problem(path: Path, error: Exception) -> DissectError:
    """Say whether the file is not JSON at all or JSON that is not a tokenizer."""
    try:
        parse_json(path.read_bytes())  # bounded: deep nesting is refused, not recursed into
    except JSONProblem as problem:
        text = str(problem)
        if text.startswith("not valid JSON"):
            return DissectError(f"tokenizer file {path} is {text}; {JSON_FIX}")
        return DissectError(f"tokenizer file {path} is not valid JSON ({text}); {JSON_FIX}")
    except OSError as unreadable:
        return DissectError(f"tokenizer file {path} cannot be read ({unreadable.strerror}); {JSON_FIX}")
    return DissectError(f"{path} is not a Hugging Face tokenizer.json ({_first_line(error)}); {JSON_FIX}")


def tokenizer_from_tiktoken(path: Path) -> tokenizers.Tokenizer:
    """A Llama 3 ``tokenizer.model`` (tiktoken ranks) as an equivalent byte-level BPE tokenizer.

    The merges are recovered from the ranks: a token of rank r is built from any two
    shorter tokens that concatenate to it, at priority r, which is how tiktoken merges.
    """
    path = Path(path)
    ranks = _read_tiktoken_ranks(path)
    if len(ranks) != LLAMA3_NUM_RANKS:
        # The special tokens' names and ids are known only for Llama 3's file.
        raise DissectError(
            f"{path} has {len(ranks)} tiktoken ranks, not Llama 3's {LLAMA3_NUM_RANKS}; "
            "only Llama 3's tokenizer.model can be read, point `tokenizer` at the model's tokenizer.json"
        )
    vocab = {token.decode("latin-1").translate(_BYTE_TO_BYTELEVEL): rank for token, rank in ranks.items()}
    # tiktoken looks a whole pre-token up in the ranks before merging; ignore_merges does the same.
    tok = tokenizers.Tokenizer(models.BPE(vocab, _merges_by_priority(vocab), ignore_merges=True))
    tok.pre_tokenizer = _llama3_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    tok.post_processor = _post_processor(byte_level=True, bos=(LLAMA3_BOS, len(ranks)), eos=None)
    return tok


def llama3_special_tokens() -> list[str]:
    """Llama 3's 256 special tokens in id order (the first gets id = number of ranks)."""
    named = list(LLAMA3_NAMED_SPECIAL_TOKENS)
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(named))]
    return named + reserved


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse the ``base64token rank`` lines; the ranks must be 0..n-1, as ids depend on it."""
    _require_file(path, TIKTOKEN_FIX)
    data = _read_bytes(path, TIKTOKEN_FIX)
    _check_tiktoken_head(path, data[:256])
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            ranks[base64.b64decode(fields[0], validate=True)] = int(fields[1])
        except (binascii.Error, ValueError):
            raise DissectError(
                f"line {number} of {path} is not 'base64token rank' (a damaged file?); {TIKTOKEN_FIX}"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DissectError(f"the ranks in {path} are not 0..{len(ranks) - 1} once each; {TIKTOKEN_FIX}")
    return ranks


def _check_tiktoken_head(path: Path, head: bytes) -> None:
    """Reject a SentencePiece protobuf (same file name, different format) and anything else."""
    if re.match(rb"[A-Za-z0-9+/]+=*[ \t]+[0-9]+(\r?\n|$)", head):
        return
    if _looks_like_sentencepiece(head):
        raise DissectError(
            f"{path} is a SentencePiece model, not a tiktoken tokenizer.model; "
            "convert it to a tokenizer.json (e.g. save the model's transformers tokenizer) and point `tokenizer` at that"
        )
    raise DissectError(f"{path} is not a tiktoken tokenizer.model (expected lines 'base64token rank'); {TIKTOKEN_FIX}")


def _looks_like_sentencepiece(head: bytes) -> bool:
    """SentencePiece's ModelProto opens with field 1 (a length-delimited piece) holding field 1 (its text)."""
    if len(head) < 3 or head[0] != 0x0A:
        return False
    position = 1
    while position < len(head) and head[position] & 0x80:  # skip the varint length
        position += 1
    return position + 1 < len(head) and head[position + 1] == 0x0A


def _llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _merges_by_priority(priority: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every (left, right) split of a piece into two other pieces, earliest-merged first.

    ``priority`` orders pieces (lower merges first): a tiktoken rank, or (-score, id) for
    SentencePiece. Ties between splits of one piece go to the higher-priority halves.
    """
    found = []
    for piece, rank in priority.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            left_rank = priority.get(left)
            if left_rank is None:
                continue
            right_rank = priority.get(right)
            if right_rank is not None:
                found.append((rank, left_rank, right_rank, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _post_processor(
    *, byte_level: bool, bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.PostProcessor | None:
    """Add BOS/EOS around a sequence the way the model's own tokenizer does."""
    steps: list[processors.PostProcessor] = []
    if byte_level:
        steps.append(processors.ByteLevel(trim_offsets=False))
    if bos is not None or eos is not None:
        first = [bos[0]] if bos else []
        last = [eos[0]] if eos else []
        steps.append(
            processors.TemplateProcessing(
                single=[*first, "$A", *last],
                pair=[*first, "$A", *last, *(f"{name}:1" for name in first), "$B:1", *(f"{name}:1" for name in last)],
                special_tokens=[token for token in (bos, eos) if token is not None],
            )
        )
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


# --------------------------------------------------------------------------------------
# GGUF


def tokenizer_from_gguf(path: Path) -> tokenizers.Tokenizer:
    """The tokenizer stored in a GGUF checkpoint's ``tokenizer.ggml.*`` metadata.

    Supports byte-level BPE (``gpt2``) and SentencePiece BPE (``llama``).
    """
    path = Path(path)
    meta = _read_gguf_tokenizer_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise DissectError(f"{path} holds no tokenizer (no tokenizer.ggml.model); {GGUF_FIX}")
    builders = {"gpt2": _gguf_byte_level_bpe, "llama": _gguf_sentencepiece}
    builder = builders.get(kind)
    if builder is None:
        raise DissectError(
            f"{path} holds a {kind!r} tokenizer, which cannot be read from GGUF "
            f"(only 'gpt2' byte-level BPE and 'llama' SentencePiece); {GGUF_FIX}"
        )
    tokens = _gguf_tokens(meta, path)
    try:
        tok = builder(meta, tokens, path)
    except DissectError:
        raise
    except Exception as error:  # tokenizers rejects inconsistent vocab/merges with a bare Exception
        raise DissectError(f"the tokenizer metadata in {path} is inconsistent ({_first_line(error)}); {GGUF_FIX}") from error
    return _for_description(tok)


def _read_gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` key/values as plain Python values.

    The header parser is shared with the embedding reader and caches per file, so a run
    that reads both the matrix and the tokenizer of one GGUF parses its header once.
    """
    from pipeline.formats.gguf_file import read_gguf

    _require_file(path, GGUF_FIX)
    metadata = read_gguf(path).metadata
    return {
        key: value.tolist() if hasattr(value, "tolist") else value
        for key, value in metadata.items()
        if key.startswith("tokenizer.ggml.")
    }


def _gguf_tokens(meta: dict[str, Any], path: Path) -> list[str]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise DissectError(f"{path} has no tokenizer.ggml.tokens list; {GGUF_FIX}")
    first_ids: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if first_ids.setdefault(token, index) != index:
            raise DissectError(
                f"{path} lists the token {token!r} at ids {first_ids[token]} and {index}, "
                f"which a tokenizer cannot tell apart; {GGUF_FIX}"
            )
    return tokens


def _gguf_list(meta: dict[str, Any], key: str, length: int, default: Any, path: Path) -> list[Any]:
    values = meta.get(key)
    if values is None:
        return [default] * length
    if len(values) != length:
        raise DissectError(f"{path} has {len(values)} {key} entries for {length} tokens; {GGUF_FIX}")
    return values


def _gguf_byte_level_bpe(meta: dict[str, Any], tokens: list[str], path: Path) -> tokenizers.Tokenizer:
    """GPT-2-style byte-level BPE (``tokenizer.ggml.model == "gpt2"``)."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    merges = [_split_merge(merge, path) for merge in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    # llama.cpp skips merges for Llama 3 pre-tokens found whole in the vocab, like tiktoken.
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in GGUF_LLAMA3_PRE))
    tok.pre_tokenizer = _gguf_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(tok, tokens, meta, path)
    tok.post_processor = _post_processor(byte_level=True, **_gguf_bos_eos(meta, tokens, pre in GGUF_LLAMA3_PRE, path))
    return tok


def _split_merge(merge: str, path: Path) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2:
        raise DissectError(f"{path} has a malformed merge {merge!r} (expected 'left right'); {GGUF_FIX}")
    return parts[0], parts[1]


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """How llama.cpp splits text before BPE, per tokenizer.ggml.pre."""
    if pre == "smollm":
        # As in SmolLM2's own tokenizer.json: every digit alone, then GPT-2's split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in GGUF_LLAMA3_PRE:
        return _llama3_pre_tokenizer()
    # Other pre-tokenizers get GPT-2's split: the vocabulary reads the same, but encodings
    # of text may differ from llama.cpp's in digit and punctuation runs.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _gguf_sentencepiece(meta: dict[str, Any], tokens: list[str], path: Path) -> tokenizers.Tokenizer:
    """SentencePiece BPE (``tokenizer.ggml.model == "llama"``): ``▁`` for spaces, ``<0xNN>`` byte fallback."""
    scores = _gguf_list(meta, "tokenizer.ggml.scores", len(tokens), 0.0, path)
    types = _gguf_list(meta, "tokenizer.ggml.token_type", len(tokens), GGUF_NORMAL, path)
    vocab = {token: index for index, token in enumerate(tokens)}
    # SentencePiece merges the adjacent pair whose result has the highest score; only
    # ordinary pieces take part (control, byte and unused pieces are never built by merging).
    priority = {token: (-scores[index], index) for index, token in enumerate(tokens) if types[index] == GGUF_NORMAL}
    unknown = _gguf_token_id(meta, "tokenizer.ggml.unknown_token_id", tokens, path)
    tok = tokenizers.Tokenizer(
        models.BPE(
            vocab,
            _merges_by_priority(priority),
            unk_token=tokens[unknown] if unknown is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    space = normalizers.Replace(" ", SENTENCEPIECE_SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SENTENCEPIECE_SPACE), space]) if add_space_prefix else space
    steps = [decoders.Replace(SENTENCEPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if add_space_prefix else steps)
    _add_gguf_added_tokens(tok, tokens, meta, path)
    tok.post_processor = _post_processor(byte_level=False, **_gguf_bos_eos(meta, tokens, True, path))
    return tok


def _add_gguf_added_tokens(tok: tokenizers.Tokenizer, tokens: list[str], meta: dict[str, Any], path: Path) -> None:
    """Control and unknown tokens become special tokens; user-defined ones plain added tokens.

    Either kind is matched whole in the input before the model sees it, as llama.cpp does.
    They are already in the vocabulary, so they keep their ids.
    """
    types = _gguf_list(meta, "tokenizer.ggml.token_type", len(tokens), GGUF_NORMAL, path)
    special = [tokens[i] for i, kind in enumerate(types) if kind in (GGUF_CONTROL, GGUF_UNKNOWN)]
    user = [tokens[i] for i, kind in enumerate(types) if kind == GGUF_USER_DEFINED]
    tok.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    tok.add_tokens([AddedToken(token, special=False, normalized=False) for token in user])


def _gguf_bos_eos(
    meta: dict[str, Any], tokens: list[str], add_bos_default: bool, path: Path
) -> dict[str, tuple[str, int] | None]:
    """The BOS/EOS the model adds to every sequence; absent flags take llama.cpp's defaults."""
    chosen: dict[str, tuple[str, int] | None] = {"bos": None, "eos": None}
    for name, default in (("bos", add_bos_default), ("eos", False)):
        if bool(meta.get(f"tokenizer.ggml.add_{name}_token", default)):
            index = _gguf_token_id(meta, f"tokenizer.ggml.{name}_token_id", tokens, path)
            if index is not None:
                chosen[name] = (tokens[index], index)
    return chosen


def _gguf_token_id(meta: dict[str, Any], key: str, tokens: list[str], path: Path) -> int | None:
    index = meta.get(key)
    if index is None:
        return None
    if not is_whole(index):
        raise DissectError(f"{path} has {key} of type {type(index).__name__}, not a whole number; {GGUF_FIX}")
    if not 0 <= index < len(tokens):
        raise DissectError(f"{path} has {key} = {index}, outside its {len(tokens)} tokens; {GGUF_FIX}")
    return int(index)


# --------------------------------------------------------------------------------------
# Finding a tokenizer next to a model


def detect_tokenizer(folder: Path) -> tuple[str, Path] | None:
    """The tokenizer in a model folder as (kind, path), or None if there is none.

    ``tokenizer.json`` wins because it is complete; a ``tokenizer.model`` is used only when
    it is tiktoken (Llama 3). A SentencePiece ``tokenizer.model`` is a :class:`DissectError`.
    """
    folder = Path(folder)
    for kind, name in (("tokenizer.json", "tokenizer.json"), ("tiktoken", "tokenizer.model")):
        candidate = folder / name
        if not (candidate.exists() or candidate.is_symlink()):
            continue
        found = file_inside(folder, name, "the tokenizer file", "point `tokenizer` at a tokenizer file you trust")
        if kind == "tiktoken":
            _check_tiktoken_head(found, _read_head(found, 256))
        return kind, found
    return None


# --------------------------------------------------------------------------------------
# Describing the vocabulary


def token_pieces(tok: tokenizers.Tokenizer) -> list[TokenPiece]:
    """The readable piece of every id, 0 .. vocabulary size (with added tokens) - 1, with its kind and key."""
    by_id = _tokens_by_id(tok)
    added = {index: token.content for index, token in tok.get_added_tokens_decoder().items()}
    decode = _piece_decoder(tok)
    pieces = [TokenPiece(added[index]) if index in added else decode(token) for index, token in enumerate(by_id)]
    kinds = token_kinds(tok, by_id)
    keys = token_keys([piece.text for piece in pieces], kinds, by_id)
    return [replace(piece, kind=kind, key=key) for piece, kind, key in zip(pieces, kinds, keys)]


def token_kinds(tok: tokenizers.Tokenizer, by_id: list[str] | None = None) -> list[str]:
    """The kind (:data:`TOKEN_KINDS`, never padding) of every id, from its name and the tokenizer.

    A placeholder name (:data:`UNUSED_NAME`) makes a token ``unused`` whether or not it is
    special; then special tokens; then, in a byte-fallback vocabulary, ``<0xNN>`` pieces.
    """
    by_id = _tokens_by_id(tok) if by_id is None else by_id
    special = special_token_ids(tok)
    byte_fallback = bool(getattr(tok.model, "byte_fallback", False))
    return [
        "unused" if UNUSED_NAME.fullmatch(token)
        else "special" if index in special
        else "byte" if byte_fallback and _BYTE_PIECE.fullmatch(token)
        else "normal"
        for index, token in enumerate(by_id)
    ]


def token_keys(texts: list[str], kinds: list[str], entries: list[str]) -> list[str]:
    """A unique key per id: the text, but a byte-fallback piece keeps its name (``<0x0A>``).

    Those names are what makes keys unique in real vocabularies; should a text still repeat,
    each later id's key gets ``<id:N>`` appended (the first keeps its text).
    """
    keys = [entry if kind == "byte" else text for text, kind, entry in zip(texts, kinds, entries)]
    seen: set[str] = set()
    for index, key in enumerate(keys):
        if key in seen:
            keys[index] = f"{key}<id:{index}>"
        seen.add(keys[index])
    return keys


def _tokens_by_id(tok: tokenizers.Tokenizer) -> list[str]:
    size = tok.get_vocab_size(with_added_tokens=True)
    by_id: list[str | None] = [None] * size
    for token, index in tok.get_vocab(with_added_tokens=True).items():
        if index >= size:
            raise DissectError(f"the tokenizer maps {token!r} to id {index}, beyond its {size} ids; {JSON_FIX}")
        by_id[index] = token
    gaps = [index for index, token in enumerate(by_id) if token is None]
    if gaps:
        raise DissectError(f"the tokenizer has no token for {len(gaps)} ids (first {gaps[0]}); {JSON_FIX}")
    return by_id  # type: ignore[return-value]  # no None left


def _piece_decoder(tok: tokenizers.Tokenizer) -> Callable[[str], TokenPiece]:
    """How this vocabulary spells text, judged from its decoder (pre-tokenizer if none)."""
    decoder_nodes = list(_json_nodes(tok.decoder))
    nodes = decoder_nodes or list(_json_nodes(tok.pre_tokenizer))
    if any(node.get("type") == "ByteLevel" for node in nodes):
        return _byte_level_piece
    if any(_is_sentencepiece_node(node) for node in nodes):
        byte_fallback = bool(getattr(tok.model, "byte_fallback", False))
        return lambda token: _sentencepiece_piece(token, byte_fallback)
    return TokenPiece  # WordPiece and word-level vocabularies are already text


def _json_nodes(component: Any) -> Iterator[dict[str, Any]]:
    """Every object in a decoder's or pre-tokenizer's serialised form (Sequence members included)."""
    if component is None:
        return
    stack: list[Any] = [json.loads(component.__getstate__())]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _is_sentencepiece_node(node: dict[str, Any]) -> bool:
    if node.get("type") in ("Metaspace", "ByteFallback"):
        return True
    pattern = node.get("pattern")
    return node.get("type") == "Replace" and isinstance(pattern, dict) and pattern.get("String") == SENTENCEPIECE_SPACE


def _byte_level_piece(token: str) -> TokenPiece:
    try:
        data = token.translate(_BYTELEVEL_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return TokenPiece(token)  # not spelled in the byte-level alphabet: keep it as written
    return _piece_from_bytes(data)


def _sentencepiece_piece(token: str, byte_fallback: bool) -> TokenPiece:
    if byte_fallback:
        byte = _BYTE_PIECE.fullmatch(token)
        if byte:
            return _piece_from_bytes(bytes([int(byte[1], 16)]))
    return TokenPiece(token.replace(SENTENCEPIECE_SPACE, " "))


def _piece_from_bytes(data: bytes) -> TokenPiece:
    try:
        return TokenPiece(data.decode("utf-8"))
    except UnicodeDecodeError:
        # surrogateescape marks exactly the undecodable bytes, which then read as <0xNN>
        escaped = data.decode("utf-8", "surrogateescape")
        return TokenPiece(_ESCAPED_BYTE.sub(lambda byte: f"<0x{ord(byte[0]) - 0xDC00:02X}>", escaped), data)


def special_token_ids(tok: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of the special tokens (BOS, EOS, [CLS], [SEP], <|...|>), not of ordinary added words."""
    return frozenset(index for index, token in tok.get_added_tokens_decoder().items() if token.special)


def word_token_ids(tok: tokenizers.Tokenizer, text: str) -> list[int]:
    """The ids ``text`` is split into, without BOS/EOS/CLS/SEP or padding."""
    encoding = tok.encode(text, add_special_tokens=False)
    # The attention mask drops padding a caller's tokenizer may still have switched on.
    return [index for index, keep in zip(encoding.ids, encoding.attention_mask) if keep]


# --------------------------------------------------------------------------------------
# Helpers


def _for_description(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Switch off padding and truncation: a word's ids must be exactly its own tokens."""
    tok.no_padding()
    tok.no_truncation()
    return tok


def _require_file(path: Path, fix: str) -> None:
    if not path.exists():
        raise DissectError(f"tokenizer file {path} does not exist; {fix}")
    if not path.is_file():
        raise DissectError(f"tokenizer path {path} is not a file; {fix}")


def _read_bytes(path: Path, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DissectError(f"tokenizer file {path} cannot be read ({error.strerror}); {fix}") from None


def _read_head(path: Path, size: int) -> bytes:
    try:
        with path.open("rb") as file:
            return file.read(size)
    except OSError as error:
        raise DissectError(f"tokenizer file {path} cannot be read ({error.strerror}); {TIKTOKEN_FIX}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
