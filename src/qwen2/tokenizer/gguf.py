"""Tokenizer files from a GGUF's `tokenizer.*` metadata.

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary, merges, token types, special
token ids and chat template as metadata. We write them out in transformers' layout (vocab.json,
merges.txt, tokenizer_config.json, tokenizer.json) so that both our tokenizers and transformers'
load the directory like any hub checkpoint. Token types follow llama.cpp's enum: 3 (CONTROL) is a
special token, 4 (USER_DEFINED, e.g. Qwen2.5's `<tool_call>`) an added token that is not special;
transformers' own GGUF loader draws the same line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from qwen2.tokenizer.byte_level import BYTE_TO_UNICODE, PRETOKENIZE_REGEX

logger = logging.getLogger(__name__)

# llama.cpp's names for vocabularies that split text with Qwen2's regex.
QWEN2_PRE_TOKENIZERS = frozenset({"qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"})
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
DEFAULT_MODEL_MAX_LENGTH = 32768  # Qwen2's documented context when the file does not state one.
_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def tokenizer_metadata_from_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """The `tokenizer.*` key/values of a GGUF file as plain Python values (str, int, bool, lists).

    `general.architecture` and `<arch>.context_length` are included too when present, since the
    tokenizer's `model_max_length` comes from the latter. Read through the project's one
    bounds-checked GGUF reader (a `gguf.GGUFReader` subclass), which refuses corrupt files.
    """
    from qwen2.loading.gguf import GGUFFile

    return GGUFFile(path, architecture=None).tokenizer_metadata()


def _byte_level_spelling(token: str) -> str:
    """A token as the byte-level vocabulary spells it (llama.cpp may store a few in plain text)."""
    if all(ch in _BYTE_ALPHABET for ch in token):
        return token
    return "".join(BYTE_TO_UNICODE[b] for b in token.encode("utf-8"))


_BYTE_ALPHABET = frozenset(BYTE_TO_UNICODE.values())


def _added_tokens(tokens: list[str], token_types: list[int]) -> list[dict[str, Any]]:
    """Control tokens as special, user-defined ones as plain added tokens, both matched whole."""
    added = []
    for index, (token, kind) in enumerate(zip(tokens, token_types)):
        if kind == TOKEN_TYPE_CONTROL and set(token) <= _BYTE_ALPHABET:
            special = True
        elif kind == TOKEN_TYPE_USER_DEFINED:
            special = False
        else:
            continue
        added.append({
            "id": index, "content": token, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": special,
        })
    return added


def _model_max_length(metadata: dict[str, Any]) -> int:
    arch = metadata.get("general.architecture")
    value = metadata.get(f"{arch}.context_length") if arch else None
    return int(value) if value else DEFAULT_MODEL_MAX_LENGTH


def _check(metadata: dict[str, Any]) -> tuple[list[str], list[str], list[int]]:
    """The tokens, merges and token types, after checking every tokenizer key's type: a file's metadata is
    untrusted input, and a wrong type must fail here, naming the key, not deep in the writers."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2', as Qwen2 uses) can be converted"
        )
    pre = metadata.get("tokenizer.ggml.pre")
    if pre is not None and pre not in QWEN2_PRE_TOKENIZERS:
        logger.warning("tokenizer.ggml.pre is %r, not Qwen2's; text is split with Qwen2's regex anyway", pre)
    tokens = _typed_list(metadata, "tokenizer.ggml.tokens", str)
    merges = metadata.get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError("GGUF metadata has no tokenizer.ggml.merges; a byte-level BPE needs its merge list")
    merges = _typed_list(metadata, "tokenizer.ggml.merges", str)
    bad = next((m for m in merges if len(m.split(" ")) != 2 or "" in m.split(" ")), None)
    if bad is not None:
        raise ValueError(f"tokenizer.ggml.merges holds {bad!r}; each merge is two tokens separated by one space")
    token_types = _typed_list(metadata, "tokenizer.ggml.token_type", int) if metadata.get(
        "tokenizer.ggml.token_type") else [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise ValueError(
            f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
        )
    seen: dict[str, int] = {}
    for index, token in enumerate(tokens):  # a vocabulary maps each spelling to one id: a repeat would lose one
        first = seen.setdefault(_byte_level_spelling(token), index)
        if first != index:
            raise ValueError(f"tokenizer.ggml.tokens holds {token!r} twice (ids {first} and {index}); each token "
                             f"string must be unique")
    for key, kind in (("tokenizer.chat_template", str), ("tokenizer.ggml.add_bos_token", bool),
                      *((key, int) for key in _SPECIAL_IDS.values())):
        value = metadata.get(key)
        if value is not None and (not isinstance(value, kind) or kind is int and isinstance(value, bool)):
            raise ValueError(f"{key} must be a {kind.__name__}, not {type(value).__name__} ({value!r:.80})")
    return tokens, merges, token_types


def _typed_list(metadata: dict[str, Any], key: str, kind: type) -> list:
    values = metadata.get(key)
    if not isinstance(values, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        found = type(values).__name__ if not isinstance(values, list) else \
            f"an array holding {type(next(v for v in values if not isinstance(v, kind) or isinstance(v, bool))).__name__}"
        raise ValueError(f"{key} must be an array of {kind.__name__}, not {found}")
    return values


def write_tokenizer_files(metadata: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and tokenizer.json into `out_dir`."""
    tokens, merges, token_types = _check(metadata)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    vocab = {_byte_level_spelling(token): index for index, token in enumerate(tokens)}
    added = _added_tokens(tokens, token_types)
    specials = {}
    for name, key in _SPECIAL_IDS.items():
        token_id = metadata.get(key)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(f"{key} = {token_id} is outside the vocabulary of {len(tokens)} tokens")
        specials[name] = tokens[int(token_id)] if token_id is not None else None

    config: dict[str, Any] = {
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added
        },
        **specials,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": _model_max_length(metadata),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab,
            "merges": [merge.split(" ") for merge in merges],
        },
    }

    _write_json(out / "vocab.json", vocab)
    with open(out / "merges.txt", "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
        fh.write("\n".join(merges))
        fh.write("\n")
    _write_json(out / "tokenizer_config.json", config, indent=2)
    _write_json(out / "tokenizer.json", tokenizer_json, indent=None)


def _write_json(path: Path, value: Any, indent: int | None = None) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh, ensure_ascii=False, indent=indent)
        fh.write("\n")
