"""`__call__`, `encode`, `tokenize` and `pad`: transformers 5's call surface over a tokenizer's ids.

Reference: transformers' `PreTrainedTokenizerBase.__call__` / `pad` and `TokenizersBackend._encode_plus`;
padding and truncation follow `tokenizers`' rules (see `padding.py`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from qwen2.tokenizer.alignment import Encoding, truncate_and_merge
from qwen2.tokenizer.encoding import BatchEncoding, to_python
from qwen2.tokenizer.padding import VERY_LARGE_INTEGER, pad_length, pad_rows, resolve_strategies, truncate

logger = logging.getLogger(__name__)


class EncodingMixin:
    """Turns text into `BatchEncoding`s; the subclass supplies `_encode_texts`."""

    def tokenize(
        self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs: Any
    ) -> list[str]:
        """Token strings of `text` (and `pair`), e.g. `['Hello', 'Ġworld']`."""
        split = kwargs.get("split_special_tokens", self.split_special_tokens)
        ids = self._encode_texts([text] + ([pair] if pair else []), split)
        return [self._id_to_token(i) for row in ids for i in row]

    def encode(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding: Any = False,
        truncation: Any = None,
        max_length: int | None = None,
        stride: int = 0,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """The ids of one text (a list, or a (1, n) tensor with `return_tensors`)."""
        if (type(text) is str and text_pair is None and padding is False and truncation is None
                and max_length is None and return_tensors is None and not kwargs.keys() - {"split_special_tokens"}):
            # The common case needs none of the padding/truncation machinery.
            return self._encode_texts([text], kwargs.get("split_special_tokens", self.split_special_tokens))[0]
        encoded = self(
            text, text_pair=text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
            max_length=max_length, stride=stride, padding_side=padding_side, return_tensors=return_tensors,
            return_attention_mask=False, **kwargs,
        )
        return encoded["input_ids"]

    def __call__(
        self,
        text: Any = None,
        text_pair: Any = None,
        text_target: Any = None,
        text_pair_target: Any = None,
        add_special_tokens: bool = True,
        padding: Any = False,
        truncation: Any = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenize one text, a pair, or a batch, with padding, truncation and tensors as requested."""
        options = dict(tokenizer_kwargs or {})
        options.update(kwargs)
        split_special_tokens = options.pop("split_special_tokens", self.split_special_tokens)
        max_target_length = options.pop("max_target_length", None)
        if options.pop("sanitize_control_tokens", False):
            raise ValueError("sanitize_control_tokens is an apply_chat_template option: pass it there")
        if options:
            raise TypeError(f"unexpected keyword arguments {sorted(options)}")
        if text is None and text_target is None:
            raise ValueError("You need to specify either `text` or `text_target`.")
        padding, truncation, max_length = resolve_strategies(
            padding, truncation, max_length, pad_to_multiple_of, self.model_max_length, self.pad_token is not None
        )
        if stride < 0:
            raise ValueError(f"stride={stride} must be >= 0")
        common = dict(
            padding=padding, truncation=truncation, stride=stride, pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side, return_tensors=return_tensors, return_token_type_ids=return_token_type_ids,
            return_attention_mask=return_attention_mask, return_overflowing_tokens=return_overflowing_tokens,
            return_special_tokens_mask=return_special_tokens_mask, return_offsets_mapping=return_offsets_mapping,
            return_length=return_length, is_split_into_words=is_split_into_words,
            split_special_tokens=split_special_tokens,
        )
        encodings = target = None
        if text is not None:
            encodings = self._encode_plus(text, text_pair, max_length=max_length, **common)
        if text_target is not None:
            length = max_target_length if max_target_length is not None else max_length
            target = self._encode_plus(text_target, text_pair_target, max_length=length, **common)
        if target is None:
            return encodings
        if encodings is None:
            return target
        encodings["labels"] = target["input_ids"]
        return encodings

    def _encode_plus(
        self,
        text: Any,
        text_pair: Any,
        *,
        padding: str,
        truncation: str,
        max_length: int | None,
        stride: int,
        pad_to_multiple_of: int | None,
        padding_side: str | None,
        return_tensors: str | None,
        return_token_type_ids: bool | None,
        return_attention_mask: bool | None,
        return_overflowing_tokens: bool,
        return_special_tokens_mask: bool,
        return_offsets_mapping: bool,
        return_length: bool,
        is_split_into_words: bool,
        split_special_tokens: bool,
        aligned: bool = False,
    ) -> BatchEncoding:
        _check_text(text, is_split_into_words, "text")
        if text_pair is not None:
            _check_text(text_pair, is_split_into_words, "text_pair")
        if is_split_into_words:
            batched = bool(text) and isinstance(text[0], (list, tuple))
        else:
            batched = isinstance(text, (list, tuple))
        if batched:
            if isinstance(text_pair, str):
                raise TypeError("when tokenizing a batch, text_pair must be a list of the same length as text")
            if text_pair is not None and len(text_pair) != len(text):
                raise ValueError(f"batch length of text ({len(text)}) does not match text_pair ({len(text_pair)})")
            firsts, seconds = list(text), list(text_pair) if text_pair is not None else None
        else:
            firsts, seconds = [text], [text_pair] if text_pair else None

        want_types = self._wants("token_type_ids", return_token_type_ids)
        want_mask = self._wants("attention_mask", return_attention_mask)
        side = padding_side or self.padding_side
        samples: list[int] = []
        if aligned or return_offsets_mapping or return_overflowing_tokens:
            encodings, samples = self._aligned_rows(
                firsts, seconds, truncation, max_length, stride, padding, pad_to_multiple_of, side,
                is_split_into_words, split_special_tokens, return_overflowing_tokens,
            )
            rows: dict[str, list[Any]] = {"input_ids": [e.ids for e in encodings]}
            fields = [("token_type_ids", "type_ids", want_types), ("attention_mask", "attention_mask", want_mask),
                      ("special_tokens_mask", "special_tokens_mask", return_special_tokens_mask),
                      ("offset_mapping", "offsets", return_offsets_mapping)]
            for key, name, wanted in fields:
                if wanted:
                    rows[key] = [getattr(e, name) for e in encodings]
        else:
            rows = self._id_rows(firsts, seconds, truncation, max_length, is_split_into_words, split_special_tokens,
                                 want_types, want_mask, return_special_tokens_mask)
            target = pad_length([len(ids) for ids in rows["input_ids"]], padding, max_length, pad_to_multiple_of)
            if target is not None:
                rows = pad_rows(rows, target, side, {
                    "input_ids": self.pad_token_id, "token_type_ids": self.pad_token_type_id,
                    "attention_mask": 0, "special_tokens_mask": 1,
                })
            # The alignment (word_ids(), char_to_token(), ...) is computed only if asked for.
            aligned_call = functools.partial(
                self._encode_plus, text, text_pair, padding=padding, truncation=truncation, max_length=max_length,
                stride=stride, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side, return_tensors=None,
                return_token_type_ids=False, return_attention_mask=False, return_overflowing_tokens=False,
                return_special_tokens_mask=False, return_offsets_mapping=False, return_length=False,
                is_split_into_words=is_split_into_words, split_special_tokens=split_special_tokens, aligned=True,
            )

            def encodings() -> list[Encoding]:
                return aligned_call().encodings
        if return_length:
            rows["length"] = [len(ids) for ids in rows["input_ids"]]
        if return_overflowing_tokens:
            rows["overflow_to_sample_mapping"] = samples
        if self.model_max_length < VERY_LARGE_INTEGER and max_length is None:
            for ids in rows["input_ids"]:
                if len(ids) > self.model_max_length:
                    logger.warning(
                        "Token indices sequence length is longer than the specified maximum sequence length for "
                        "this model (%d > %d). Running this sequence through the model will result in indexing "
                        "errors", len(ids), self.model_max_length,
                    )
                    break
        n_sequences = 2 if seconds else 1
        if not batched and return_tensors is None and not return_overflowing_tokens:
            single = {key: value[0] if key != "length" else value for key, value in rows.items()}
            return BatchEncoding(single, encoding=encodings, n_sequences=n_sequences)
        return BatchEncoding(rows, encoding=encodings, tensor_type=return_tensors, n_sequences=n_sequences)

    def _id_rows(
        self, firsts: list[Any], seconds: list[Any] | None, truncation: str, max_length: int | None,
        is_split_into_words: bool, split_special_tokens: bool, want_types: bool, want_mask: bool, want_special: bool,
    ) -> dict[str, list[list[int]]]:
        """The rows of ids (and masks) of each text or pair, truncated, not yet padded."""
        first_ids = self._encode_inputs(firsts, is_split_into_words, split_special_tokens)
        second_ids = self._encode_inputs(seconds, is_split_into_words, split_special_tokens) if seconds else None
        rows: dict[str, list[list[int]]] = {"input_ids": []}
        types = []
        for index, ids in enumerate(first_ids):
            pair = second_ids[index] if second_ids is not None else None
            ids, pair = truncate(ids, pair, truncation, max_length, self.truncation_side)
            rows["input_ids"].append(ids + (pair or []))
            types.append([0] * len(ids) + [1] * len(pair or []))
        if want_types:
            rows["token_type_ids"] = types
        if want_mask:
            rows["attention_mask"] = [[1] * len(ids) for ids in rows["input_ids"]]
        if want_special:
            rows["special_tokens_mask"] = [[0] * len(ids) for ids in rows["input_ids"]]
        return rows

    def _aligned_rows(
        self, firsts: list[Any], seconds: list[Any] | None, truncation: str, max_length: int | None, stride: int,
        padding: str, pad_to_multiple_of: int | None, side: str, is_split_into_words: bool,
        split_special_tokens: bool, overflowing: bool,
    ) -> tuple[list[Encoding], list[int]]:
        """Encodings of each text or pair, truncated (overflowing windows as extra rows if asked) and padded,
        with the index of the input each row came from."""
        first = self._aligned_inputs(firsts, is_split_into_words, split_special_tokens, 0)
        second = self._aligned_inputs(seconds, is_split_into_words, split_special_tokens, 1) if seconds else None
        encodings = [
            truncate_and_merge(e, second[i] if second else None, truncation, max_length, stride, self.truncation_side)
            for i, e in enumerate(first)
        ]
        rows, samples = [], []
        for index, encoding in enumerate(encodings):
            windows = [encoding] + (encoding.overflowing if overflowing else [])
            rows += windows
            samples += [index] * len(windows)
        target = pad_length([len(e) for e in rows], padding, max_length, pad_to_multiple_of)
        if target is not None:
            for encoding in encodings:
                encoding.pad(target, side, self.pad_token_id, self.pad_token, self.pad_token_type_id)
        return rows, samples

    def _aligned_inputs(
        self, inputs: list[Any], is_split_into_words: bool, split_special_tokens: bool, sequence_id: int
    ) -> list[Encoding]:
        if not is_split_into_words:
            encoded = self._encode_aligned(inputs, split_special_tokens)
            return [Encoding(e.ids, e.tokens, e.offsets, e.word_ids, sequence_id) for e in encoded]
        # Pre-split words: each is encoded alone (offsets are within the word) and is one word.
        flat = iter(self._encode_aligned([word for words in inputs for word in words], split_special_tokens))
        out = []
        for words in inputs:
            parts = [next(flat) for _ in words]
            out.append(Encoding(
                [i for p in parts for i in p.ids], [t for p in parts for t in p.tokens],
                [o for p in parts for o in p.offsets], [w for w, p in enumerate(parts) for _ in p.ids], sequence_id,
            ))
        return out

    def _wants(self, field: str, requested: bool | None) -> bool:
        """Whether to return `field`: as requested, else if the model takes it."""
        return field in self.model_input_names if requested is None else requested

    def _encode_inputs(
        self, inputs: list[Any], is_split_into_words: bool, split_special_tokens: bool
    ) -> list[list[int]]:
        if not is_split_into_words:
            return self._encode_texts(inputs, split_special_tokens)
        # Pre-split words are encoded one by one and joined, as `tokenizers` does for pretokenized input.
        flat = [word for words in inputs for word in words]
        encoded = iter(self._encode_texts(flat, split_special_tokens))
        return [[i for _ in words for i in next(encoded)] for words in inputs]

    def pad(
        self,
        encoded_inputs: Any,
        padding: Any = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Pad already-encoded inputs (a dict of lists/tensors, or a list of such dicts) to one length."""
        examples = isinstance(encoded_inputs, (list, tuple)) and encoded_inputs
        if examples and isinstance(encoded_inputs[0], (dict, BatchEncoding)):
            encoded_inputs = {key: [example[key] for example in encoded_inputs] for key in encoded_inputs[0].keys()}
        encoded_inputs = dict(encoded_inputs)
        main = self.model_input_names[0]
        if main not in encoded_inputs:
            raise ValueError(f"pad() needs {main!r} in its inputs, got {sorted(encoded_inputs)}")
        values = encoded_inputs[main]
        first = _first_leaf(values)
        if return_tensors is None and first is not None and not isinstance(first, (int, list, tuple)):
            return_tensors = "pt" if hasattr(first, "detach") else "np"
        encoded_inputs = {key: to_python(value) for key, value in encoded_inputs.items()}
        values = encoded_inputs[main]
        padding, _, max_length = resolve_strategies(
            padding, False, max_length, pad_to_multiple_of, self.model_max_length, self.pad_token is not None
        )
        batched = bool(values) and isinstance(values[0], (list, tuple))
        rows = {key: (value if batched else [value]) for key, value in encoded_inputs.items()}
        want_mask = self._wants("attention_mask", return_attention_mask)
        if want_mask and "attention_mask" not in rows:
            rows["attention_mask"] = [[1] * len(ids) for ids in rows[main]]
        if not want_mask:
            rows.pop("attention_mask", None)
        target = pad_length([len(ids) for ids in rows[main]], padding, max_length, pad_to_multiple_of)
        if target is not None:
            rows = pad_rows(rows, target, padding_side or self.padding_side, {
                main: self.pad_token_id, "token_type_ids": self.pad_token_type_id,
                "attention_mask": 0, "special_tokens_mask": 1,
            })
        if not batched:
            rows = {key: value[0] for key, value in rows.items()}
        return BatchEncoding(rows, tensor_type=return_tensors)


def _check_text(text: Any, is_split_into_words: bool, name: str) -> None:
    def is_words(t: Any) -> bool:
        return isinstance(t, (list, tuple)) and all(isinstance(w, str) for w in t)

    ok = isinstance(text, str) or (
        isinstance(text, (list, tuple)) and all(isinstance(t, str) or is_words(t) for t in text)
    )
    if not ok:
        raise ValueError(
            f"{name} must be a str, a list of str (a batch, or one pre-split text with is_split_into_words=True) "
            f"or a list of lists of str; got {type(text).__name__}"
        )


def _first_leaf(values: Any) -> Any:
    while isinstance(values, (list, tuple)):
        if not values:
            return None
        values = values[0]
    return values
