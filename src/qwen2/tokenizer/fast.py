"""`Qwen2TokenizerFast`: the same tokenizer on the Rust `tokenizers` library.

Like transformers 5's Qwen2Tokenizer, the pipeline (NFC, Qwen2's split regex, byte-level mapping and
decoder) is always Qwen2's own; tokenizer.json contributes only the BPE model and its added tokens.
Padding and truncation are done by the shared Python code so both classes agree to the id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwen2.tokenizer import files
from qwen2.tokenizer.added import AddedToken
from qwen2.tokenizer.alignment import Encoding
from qwen2.tokenizer.base import Qwen2TokenizerBase
from qwen2.tokenizer.byte_level import PRETOKENIZE_REGEX
from qwen2.tokenizer.vocabulary import added_tokens_from_config


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError(
            "Qwen2TokenizerFast needs the `tokenizers` package (pip install tokenizers); "
            "Qwen2Tokenizer is the pure-Python alternative"
        ) from exc
    return tokenizers


def _qwen2_pipeline(tokenizer: Any) -> Any:
    tk = _tokenizers()
    tokenizer.normalizer = tk.normalizers.NFC()
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.post_processor = None  # Qwen2 adds no BOS/EOS
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class Qwen2TokenizerFast(Qwen2TokenizerBase):
    """Qwen2's byte-level BPE on `tokenizers`; the same outputs as `Qwen2Tokenizer`, faster."""

    is_fast = True

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        merges_file: str | os.PathLike | None = None,
        tokenizer_file: str | os.PathLike | None = None,
        unk_token: Any = "<|endoftext|>",
        bos_token: Any = None,
        eos_token: Any = "<|endoftext|>",
        pad_token: Any = "<|endoftext|>",
        *,
        vocab: dict[str, int] | None = None,
        merges: list[Any] | None = None,
        tokenizer_object: Any = None,
        added_tokens_decoder: dict[Any, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        tk = _tokenizers()
        inherited: list[tuple[int, AddedToken]] = []
        if tokenizer_object is not None:
            backend = tk.Tokenizer.from_str(tokenizer_object.to_str())
        elif tokenizer_file is not None and Path(tokenizer_file).is_file() and vocab is None:
            try:
                backend = tk.Tokenizer.from_file(str(tokenizer_file))
            except Exception as exc:  # tokenizers raises a bare Exception on malformed files
                raise files.TokenizerFileError(f"{tokenizer_file}: cannot be read by `tokenizers` ({exc})") from None
        else:
            if vocab is not None:
                vocab = files.check_vocab(vocab, "vocab")
                merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges or []]
            elif vocab_file is not None:
                vocab = files.read_vocab(vocab_file)
                if merges_file is None:
                    raise files.TokenizerFileError(f"merges_file is required next to vocab_file {vocab_file}")
                merges = files.read_merges(merges_file)
            else:
                raise ValueError(
                    "Qwen2TokenizerFast needs a tokenizer_file, vocab_file and merges_file, or vocab and merges"
                )
            _check_merges(vocab, merges)
            backend = tk.Tokenizer(tk.models.BPE(
                vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
            ))
        inherited = [(index, AddedToken.coerce(token)) for index, token in backend.get_added_tokens_decoder().items()]
        self._tokenizer = _qwen2_pipeline(backend)
        self._vocab_cache: dict[str, int] | None = None
        configured = dict(added_tokens_from_config({"added_tokens_decoder": added_tokens_decoder or {}}))
        merged = dict(inherited)
        merged.update(configured)
        super()._init_settings(
            added_tokens=merged.items(), unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
            pad_token=pad_token, **kwargs,
        )

    @classmethod
    def _from_directory(cls, directory: Path, config: dict[str, Any]) -> "Qwen2TokenizerFast":
        json_path, vocab_path = directory / files.TOKENIZER_FILE, directory / files.VOCAB_FILE
        if json_path.is_file():
            sources: dict[str, Any] = {"tokenizer_file": json_path}
        elif vocab_path.is_file():
            sources = {"vocab_file": vocab_path, "merges_file": directory / files.MERGES_FILE}
        else:
            raise files.TokenizerFileError(
                f"{directory}: no tokenizer files; Qwen2TokenizerFast needs tokenizer.json, "
                "or vocab.json and merges.txt"
            )
        return cls(**sources, **config)

    @property
    def backend_tokenizer(self) -> Any:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer

    # ---- backend ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def _base_vocab(self) -> dict[str, int]:
        if self._vocab_cache is None:
            self._vocab_cache = self._tokenizer.get_vocab(with_added_tokens=False)
        return self._vocab_cache

    def _model_token_to_id(self, token: str) -> int | None:
        return self._tokenizer.model.token_to_id(token)

    def _model_id_to_token(self, index: int) -> str | None:
        return self._tokenizer.model.id_to_token(index) if index >= 0 else None

    def _register_added(self, tokens: list[AddedToken]) -> list[int]:
        tk = _tokenizers()
        for token in tokens:
            rust = tk.AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip,
                                 rstrip=token.rstrip, normalized=token.normalized, special=token.special)
            if token.special:
                self._tokenizer.add_special_tokens([rust])
            else:
                self._tokenizer.add_tokens([rust])
        return [self._tokenizer.token_to_id(token.content) for token in tokens]

    def _encode_texts(self, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
        tokenizer = self._tokenizer
        if tokenizer.encode_special_tokens != split_special_tokens:
            tokenizer.encode_special_tokens = split_special_tokens
        if len(texts) == 1:
            return [tokenizer.encode(texts[0], add_special_tokens=False).ids]
        return [encoding.ids for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def _encode_aligned(self, texts: list[str], split_special_tokens: bool) -> list[Encoding]:
        """Ids with offsets and words, straight from `tokenizers`' own Encoding."""
        tokenizer = self._tokenizer
        if tokenizer.encode_special_tokens != split_special_tokens:
            tokenizer.encode_special_tokens = split_special_tokens
        return [Encoding(e.ids, e.tokens, e.offsets, e.word_ids)
                for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _encode_plain(self, text: str) -> list[int]:
        tokenizer = self._tokenizer
        pieces = tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text))
        return [token.id for piece, _ in pieces for token in tokenizer.model.tokenize(piece)]

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            skip = self._skip_ids()
            ids = [i for i in ids if i not in skip]
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def save_vocabulary(self, save_directory: str | os.PathLike, filename_prefix: str | None = None) -> tuple[str, ...]:
        directory = Path(save_directory)
        if not directory.is_dir():
            raise ValueError(f"save_directory {directory} is not a directory")
        return tuple(self._tokenizer.model.save(str(directory), filename_prefix))

    def _save_model_files(self, directory: Path, filename_prefix: str | None) -> tuple[str, ...]:
        path = directory / f"{filename_prefix + '-' if filename_prefix else ''}{files.TOKENIZER_FILE}"
        self._tokenizer.save(str(path))
        return (str(path),)


def _check_merges(vocab: dict[str, int], merges: list[tuple[str, ...]]) -> None:
    """`tokenizers` rejects a bad merge with a bare message; name the merge and the file's problem instead."""
    for rank, merge in enumerate(merges):
        if len(merge) != 2 or merge[0] not in vocab or merge[1] not in vocab or merge[0] + merge[1] not in vocab:
            raise files.TokenizerFileError(
                f"merge #{rank + 1} {' '.join(merge)!r} uses a token missing from the vocabulary"
            )
