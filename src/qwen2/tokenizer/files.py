"""Reading and writing the tokenizer files of a checkpoint directory, with errors that name the file.

Layout (transformers'): vocab.json + merges.txt (the BPE model), tokenizer.json (the same model
serialised by `tokenizers`, plus its added tokens), tokenizer_config.json (special tokens,
added_tokens_decoder, model_max_length, chat_template), chat_template.jinja (where transformers 5
saves the template), and the older special_tokens_map.json / added_tokens.json / chat_template.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qwen2.loading.paths import inside

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
TOKENIZER_FILES = (
    VOCAB_FILE, MERGES_FILE, TOKENIZER_FILE, CONFIG_FILE, CHAT_TEMPLATE_FILE,
    LEGACY_CHAT_TEMPLATE_FILE, SPECIAL_TOKENS_MAP_FILE, ADDED_TOKENS_FILE,
)


_FILE_KEYS = ("vocab_file", "merges_file", "tokenizer_file")


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or malformed; the message names the file and what is wrong."""


def read_json(path: str | os.PathLike, kind: type | None = None) -> Any:
    """A JSON file's value; with `kind`, it must be of that type (dict for a config)."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        raise TokenizerFileError(f"{path}: file not found") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TokenizerFileError(f"{path}: not valid JSON ({exc})") from None
    if kind is not None and not isinstance(value, kind):
        raise TokenizerFileError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                                 f"found {type(value).__name__}")
    return value


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerFileError(f"{path}: not UTF-8 text ({exc})") from None


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """vocab.json: a JSON object mapping each token to a distinct non-negative int id."""
    vocab = read_json(path)
    return check_vocab(vocab, str(path))


def check_vocab(vocab: Any, where: str) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerFileError(f"{where}: the vocabulary must be a non-empty JSON object {{token: id}}")
    seen: dict[int, str] = {}
    for token, index in vocab.items():
        if type(index) is not int or index < 0:
            raise TokenizerFileError(f"{where}: token {token!r} has id {index!r}; ids must be non-negative ints")
        if index in seen:
            raise TokenizerFileError(f"{where}: id {index} is given to both {seen[index]!r} and {token!r}")
        seen[index] = token
    return vocab


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """merges.txt: an optional `#version` line, then one `left right` pair per line, best first."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except FileNotFoundError:
        raise TokenizerFileError(
            f"{path}: file not found; a byte-level BPE needs its merges.txt next to vocab.json "
            "(or a tokenizer.json holding both)"
        ) from None
    except UnicodeDecodeError as exc:
        raise TokenizerFileError(f"{path}: not UTF-8 text ({exc})") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=2):
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerFileError(f"{path}: line {number} is {line!r}; expected two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    return merges


def bpe_from_tokenizer_json(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges stored in a tokenizer.json (both merge spellings it has used)."""
    data = read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        raise TokenizerFileError(f"{path}: 'model' is not a BPE model; Qwen2 tokenizers are byte-level BPE")
    vocab = check_vocab(model.get("vocab"), f"{path} (model.vocab)")
    merges = []
    if not isinstance(model.get("merges") or [], list):
        raise TokenizerFileError(f"{path}: model.merges must be a list of token pairs")
    for number, merge in enumerate(model.get("merges") or []):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise TokenizerFileError(f"{path}: model.merges[{number}] is {merge!r}; expected a pair of tokens")
        merges.append((pair[0], pair[1]))
    return vocab, merges


def tokenizer_json_added_tokens(path: str | os.PathLike) -> list[dict[str, Any]]:
    data = read_json(path)
    return list(data.get("added_tokens") or []) if isinstance(data, dict) else []


def read_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json merged with the older side files, as transformers reads them."""
    config: dict[str, Any] = {}
    if (directory / CONFIG_FILE).is_file():
        config = read_json(directory / CONFIG_FILE, dict)
    for key in _FILE_KEYS:  # files a config may name: only inside the directory, and found there by name
        if config.get(key) is not None:
            inside(directory, config[key], f"{directory / CONFIG_FILE}: {key}", TokenizerFileError)
        config.pop(key, None)
    if "added_tokens_decoder" not in config:
        _merge_legacy_files(directory, config)
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        config["chat_template"] = read_text(directory / CHAT_TEMPLATE_FILE)
    elif (directory / LEGACY_CHAT_TEMPLATE_FILE).is_file():
        template = read_json(directory / LEGACY_CHAT_TEMPLATE_FILE)
        config["chat_template"] = template.get("chat_template") if isinstance(template, dict) else template
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = config.get(name)
        if isinstance(value, dict):  # the serialised AddedToken form
            config[name] = value.get("content")
    _check_types(config, directory / CONFIG_FILE)
    return config


_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_BOOL_KEYS = ("split_special_tokens", "clean_up_tokenization_spaces", "add_prefix_space", "add_bos_token",
              "add_eos_token", "legacy")


def _check_types(config: dict[str, Any], path: Path) -> None:
    """The settings a tokenizer is built from, each of the type it must have, so that a wrong one fails here
    naming the file and key instead of deep inside the tokenizer."""
    def bad(key: str, expected: str) -> TokenizerFileError:
        return TokenizerFileError(f"{path}: {key} must be {expected}, not {type(config[key]).__name__} "
                                  f"({config[key]!r:.60})")

    for key in _TOKEN_KEYS:
        if key in config and config[key] is not None and not isinstance(config[key], str):
            raise bad(key, "a token string (or its AddedToken form with a string 'content')")
    for key in _BOOL_KEYS:
        if key in config and config[key] is not None and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    length = config.get("model_max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float)) or length < 0
                               or length != length):
        raise bad("model_max_length", "a non-negative number")
    for key in ("padding_side", "truncation_side"):
        if key in config and config[key] not in ("left", "right"):
            raise bad(key, "'left' or 'right'")
    if "errors" in config and not isinstance(config["errors"], str):
        raise bad("errors", "a codec error handler name such as 'replace'")
    if not isinstance(config.get("added_tokens_decoder") or {}, dict):
        raise bad("added_tokens_decoder", "an object mapping ids to tokens")
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str) and not (isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template)):
        raise bad("chat_template", "a template string or a list of {name, template} objects")
    for key in ("extra_special_tokens", "additional_special_tokens"):
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(t, (str, dict)) for t in value)
                                      or isinstance(value, dict) and all(isinstance(t, str) for t in value.values())):
            raise bad(key, "a list of tokens")


def _merge_legacy_files(directory: Path, config: dict[str, Any]) -> None:
    """Older saves keep special tokens in special_tokens_map.json and added tokens in added_tokens.json;
    like transformers, these count only when tokenizer_config.json has no added_tokens_decoder."""
    if (directory / SPECIAL_TOKENS_MAP_FILE).is_file():
        for key, value in read_json(directory / SPECIAL_TOKENS_MAP_FILE, dict).items():
            config.setdefault(key, value)
    if (directory / ADDED_TOKENS_FILE).is_file():
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        tokens = [config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                                          "cls_token", "mask_token")] + (extra if isinstance(extra, list) else [])
        named = {t.get("content") if isinstance(t, dict) else t for t in tokens}
        decoder = config.setdefault("added_tokens_decoder", {})
        for token, index in read_json(directory / ADDED_TOKENS_FILE, dict).items():
            special = token in named
            decoder[str(index)] = {"content": token, "special": special, "normalized": not special}


def write_json(path: Path, value: Any, indent: int | None = 2) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(value, fh, ensure_ascii=False, indent=indent, sort_keys=indent is not None)
        fh.write("\n")
    return str(path)


def write_vocab_and_merges(
    directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]], prefix: str | None = None
) -> tuple[str, str]:
    stem = f"{prefix}-" if prefix else ""
    vocab_path = directory / f"{stem}{VOCAB_FILE}"
    merges_path = directory / f"{stem}{MERGES_FILE}"
    with open(vocab_path, "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
        fh.write("\n")
    with open(merges_path, "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
        fh.writelines(f"{left} {right}\n" for left, right in merges)
    return str(vocab_path), str(merges_path)
