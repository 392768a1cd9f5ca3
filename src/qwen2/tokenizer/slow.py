"""`Qwen2Tokenizer`: the pure-Python tokenizer (no `tokenizers` import), loaded from vocab.json + merges.txt."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qwen2.tokenizer import files
from qwen2.tokenizer.added import AddedToken, AddedTokenSplitter
from qwen2.tokenizer.alignment import Encoding
from qwen2.tokenizer.base import Qwen2TokenizerBase
from qwen2.tokenizer.bpe import ByteLevelBPE, token_to_bytes
from qwen2.tokenizer.normalize import nfc, nfc_aligned, pretokenize
from qwen2.tokenizer.vocabulary import added_tokens_from_config


class Qwen2Tokenizer(Qwen2TokenizerBase):
    """Byte-level BPE in pure Python with Qwen2's pre-tokenisation; same ids as transformers' Qwen2Tokenizer."""

    is_fast = False

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        merges_file: str | os.PathLike | None = None,
        errors: str = "replace",
        unk_token: Any = "<|endoftext|>",
        bos_token: Any = None,
        eos_token: Any = "<|endoftext|>",
        pad_token: Any = "<|endoftext|>",
        clean_up_tokenization_spaces: bool = False,
        split_special_tokens: bool = False,
        *,
        vocab: dict[str, int] | None = None,
        merges: list[Any] | None = None,
        tokenizer_file: str | os.PathLike | None = None,
        added_tokens_decoder: dict[Any, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if vocab is not None:
            vocab = files.check_vocab(vocab, "vocab")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges or []]
        elif vocab_file is not None:
            vocab = files.read_vocab(vocab_file)
            if merges_file is None:
                raise files.TokenizerFileError(f"merges_file is required next to vocab_file {vocab_file}")
            merges = files.read_merges(merges_file)
        elif tokenizer_file is not None:
            vocab, merges = files.bpe_from_tokenizer_json(tokenizer_file)
        else:
            raise ValueError("Qwen2Tokenizer needs vocab_file and merges_file, a tokenizer_file, or vocab and merges")
        self._bpe = ByteLevelBPE(vocab, merges)
        self._splitter = AddedTokenSplitter(())
        self._has_normalized_added = False
        self._decode_table: list[bytes] | None = None
        added = added_tokens_from_config({"added_tokens_decoder": added_tokens_decoder or {}})
        super()._init_settings(
            added_tokens=added, errors=errors, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
            pad_token=pad_token, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            split_special_tokens=split_special_tokens, **kwargs,
        )

    @classmethod
    def _from_directory(cls, directory: Path, config: dict[str, Any]) -> "Qwen2Tokenizer":
        vocab_path, merges_path, json_path = (directory / files.VOCAB_FILE, directory / files.MERGES_FILE,
                                              directory / files.TOKENIZER_FILE)
        # transformers 5 saves the added tokens only in tokenizer.json; tokenizer_config.json's
        # added_tokens_decoder (older saves) overrides them, as in the fast class.
        added: dict[Any, Any] = {}
        if json_path.is_file():
            for entry in files.tokenizer_json_added_tokens(json_path):
                if not isinstance(entry, dict) or type(entry.get("id")) is not int:
                    raise files.TokenizerFileError(f"{json_path}: added_tokens entry {entry!r} has no integer 'id'")
                added[str(entry["id"])] = entry
        added.update(config.pop("added_tokens_decoder", None) or {})
        if vocab_path.is_file() and (merges_path.is_file() or not json_path.is_file()):
            sources: dict[str, Any] = {"vocab_file": vocab_path, "merges_file": merges_path}
        elif json_path.is_file():
            sources = {"tokenizer_file": json_path}
        else:
            raise files.TokenizerFileError(
                f"{directory}: no tokenizer files; Qwen2Tokenizer needs vocab.json and merges.txt (or tokenizer.json)"
            )
        return cls(**sources, added_tokens_decoder=added, **config)

    # ---- backend ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._bpe.vocab)

    def _base_vocab(self) -> dict[str, int]:
        return self._bpe.vocab

    def _model_token_to_id(self, token: str) -> int | None:
        return self._bpe.vocab.get(token)

    def _model_id_to_token(self, index: int) -> str | None:
        table = self._bpe.id_to_token
        return table[index] if 0 <= index < len(table) else None

    def _register_added(self, tokens: list[AddedToken]) -> list[int]:
        known = {token.content: index for index, token in self._added.items()}
        next_id = max([self.vocab_size - 1, *self._added]) + 1
        ids = []
        for token in tokens:
            index = known.get(token.content, self._bpe.vocab.get(token.content))
            if index is None:
                index, next_id = next_id, next_id + 1
                known[token.content] = index
            ids.append(index)
        return ids

    def _on_added_tokens_changed(self) -> None:
        self._splitter = AddedTokenSplitter(self._added.items())
        self._has_normalized_added = any(token.normalized for token in self._added.values())
        self._decode_table = None

    def _encode_texts(self, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
        return [self._encode_one(text, split_special_tokens) for text in texts]

    def _encode_one(self, text: str, split_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        encode = self._bpe.encode_normalized
        for piece in self._splitter.split_raw(text, split_special_tokens):
            if type(piece) is int:
                ids.append(piece)
                continue
            piece = nfc(piece)
            if not self._has_normalized_added:
                ids += encode(piece)
                continue
            for part in self._splitter.split_normalized(piece, split_special_tokens):
                if type(part) is int:
                    ids.append(part)
                else:
                    ids += encode(part)
        return ids

    def _encode_aligned(self, texts: list[str], split_special_tokens: bool) -> list[Encoding]:
        return [self._align_one(text, split_special_tokens) for text in texts]

    def _align_one(self, text: str, split_special_tokens: bool) -> Encoding:
        """`_encode_one` with each token's character offsets and word, as `tokenizers` computes them: every
        piece (added token or pre-tokenizer split) is a word, and a token covers the whole characters its
        bytes came from, mapped back through NFC."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        words: list[int] = []
        pieces = 0

        def add(token_ids: list[int], spans: list[tuple[int, int]]) -> None:
            nonlocal pieces  # a piece that gives no token still takes a word index, as in `tokenizers`
            ids.extend(token_ids)
            offsets.extend(spans)
            words.extend([pieces] * len(token_ids))
            pieces += 1

        for start, end, index in self._splitter.spans_raw(text, split_special_tokens):
            if index is not None:
                add([index], [(start, end)])
                continue
            normalized, origin = nfc_aligned(text[start:end])
            if origin is None:
                origin = list(range(len(normalized)))
            parts = (self._splitter.spans_normalized(normalized, split_special_tokens)
                     if self._has_normalized_added else [(0, len(normalized), None)])
            for a, b, part_index in parts:
                if part_index is not None:
                    add([part_index], [(start + origin[a], start + origin[b - 1] + 1)])
                    continue
                for piece_start, piece in _positions(a, pretokenize(normalized[a:b])):
                    piece_ids = self._bpe.encode_piece(piece)
                    add(piece_ids, [(start + origin[piece_start + c0], start + origin[piece_start + c1 - 1] + 1)
                                    for c0, c1 in self._piece_chars(piece, piece_ids)])
        return Encoding(ids, [self._id_to_token(i) for i in ids], offsets, words)

    def _piece_chars(self, piece: str, piece_ids: list[int]) -> list[tuple[int, int]]:
        """Character span within `piece` of each of its tokens (a token holding part of a character's
        bytes covers that whole character). As in `tokenizers`, tokens are laid end to end from the
        piece's start: bytes the vocabulary cannot spell were dropped and take no room."""
        char_of_byte = [index for index, ch in enumerate(piece) for _ in ch.encode("utf-8")]
        lengths = self._bpe.token_bytes()
        spans, at = [], 0
        for index in piece_ids:
            size = len(lengths[index])
            spans.append((char_of_byte[at], char_of_byte[at + size - 1] + 1))
            at += size
        return spans

    def _encode_plain(self, text: str) -> list[int]:
        return self._bpe.encode_normalized(nfc(text))

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        table = self._decode_table
        if table is None:
            table = list(self._bpe.token_bytes())
            top = max(self._added, default=-1)
            table += [b""] * (top + 1 - len(table))
            for index, token in self._added.items():
                table[index] = token_to_bytes(token.content)
            self._decode_table = table
        if skip_special_tokens:
            skip = self._skip_ids()
            data = b"".join([table[i] for i in ids if i not in skip])
        else:
            data = b"".join([table[i] for i in ids])
        return data.decode("utf-8", errors=self.errors)

    def save_vocabulary(self, save_directory: str | os.PathLike, filename_prefix: str | None = None) -> tuple[str, ...]:
        directory = Path(save_directory)
        if not directory.is_dir():
            raise ValueError(f"save_directory {directory} is not a directory")
        return files.write_vocab_and_merges(directory, self._bpe.vocab, self._bpe.merges, filename_prefix)

    def _save_model_files(self, directory: Path, filename_prefix: str | None) -> tuple[str, ...]:
        return self.save_vocabulary(directory, filename_prefix)


def _positions(start: int, pieces: list[str]) -> list[tuple[int, str]]:
    """Each consecutive piece with the index it starts at."""
    out = []
    for piece in pieces:
        out.append((start, piece))
        start += len(piece)
    return out
