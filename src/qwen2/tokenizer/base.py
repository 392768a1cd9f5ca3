"""The call surface both Qwen2 tokenizers share, with transformers 5's semantics.

Reference: transformers' `tokenization_utils_base.py` and `tokenization_utils_tokenizers.py`
(`PreTrainedTokenizerBase`, `TokenizersBackend`). A subclass supplies the model: encoding text to
ids, decoding ids, the base vocabulary and how added tokens get ids. Everything users touch --
special tokens, `__call__`, padding and truncation, decoding, saving and loading, chat templates --
lives here once, so the pure-Python and the `tokenizers`-backed classes cannot drift apart.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from qwen2.tokenizer import files
from qwen2.tokenizer.added import AddedToken
from qwen2.tokenizer.encoding import BatchEncoding
from qwen2.tokenizer.padding import VERY_LARGE_INTEGER, pad_length, pad_rows, resolve_strategies, truncate

logger = logging.getLogger(__name__)

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Constructor arguments that are settings of the tokenizer, not of its vocabulary files.
_INIT_SETTINGS = (
    "model_max_length", "padding_side", "truncation_side", "model_input_names", "clean_up_tokenization_spaces",
    "split_special_tokens", "chat_template", "errors", "add_prefix_space", "add_bos_token", "add_eos_token",
)


def _special_property(name: str) -> property:
    def get(self: "Qwen2TokenizerBase") -> str | None:
        value = self._special_tokens[name]
        return None if value is None else str(value)

    def set_(self: "Qwen2TokenizerBase", value: str | AddedToken | None) -> None:
        if value is not None and not isinstance(value, str) and not hasattr(value, "content"):
            raise ValueError(f"{name} must be a string or an AddedToken, got {type(value).__name__}")
        self._special_tokens[name] = None if value is None else str(value)

    return property(get, set_, doc=f"The {name.replace('_', ' ')} as a string, or None when unset.")


def _special_id_property(name: str) -> property:
    def get(self: "Qwen2TokenizerBase") -> int | None:
        token = self._special_tokens[name]
        return None if token is None else self.convert_tokens_to_ids(token)

    def set_(self: "Qwen2TokenizerBase", value: int | None) -> None:
        self._special_tokens[name] = None if value is None else self.convert_ids_to_tokens(int(value))

    return property(get, set_, doc=f"The id of the {name.replace('_', ' ')}, or None when unset.")


class Qwen2TokenizerBase:
    """Shared behaviour of `Qwen2Tokenizer` and `Qwen2TokenizerFast`."""

    vocab_files_names = {"vocab_file": files.VOCAB_FILE, "merges_file": files.MERGES_FILE,
                         "tokenizer_file": files.TOKENIZER_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"
    truncation_side = "right"
    SPECIAL_TOKENS_ATTRIBUTES = list(SPECIAL_TOKENS_ATTRIBUTES)
    is_fast = False

    for _name in SPECIAL_TOKENS_ATTRIBUTES:
        locals()[_name] = _special_property(_name)
        locals()[f"{_name}_id"] = _special_id_property(_name)
    del _name

    # ---- what a subclass provides ------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        raise NotImplementedError

    def _base_vocab(self) -> dict[str, int]:
        raise NotImplementedError

    def _register_added(self, tokens: list[AddedToken]) -> list[int]:
        """Make the backend match these tokens whole; return the id each one got."""
        raise NotImplementedError

    def _on_added_tokens_changed(self) -> None:
        """Called after the added vocabulary changed (to rebuild matchers, caches)."""

    def _encode_texts(self, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of `text` as plain text: no added token, special or not, is matched."""
        raise NotImplementedError

    def _model_token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _model_id_to_token(self, index: int) -> str | None:
        raise NotImplementedError

    def _save_model_files(self, directory: Path, filename_prefix: str | None) -> tuple[str, ...]:
        raise NotImplementedError

    # ---- construction ------------------------------------------------------------------------
    def _init_settings(
        self,
        *,
        added_tokens: Iterable[tuple[int, AddedToken]] = (),
        bos_token: Any = None,
        eos_token: Any = "<|endoftext|>",
        unk_token: Any = "<|endoftext|>",
        pad_token: Any = "<|endoftext|>",
        sep_token: Any = None,
        cls_token: Any = None,
        mask_token: Any = None,
        extra_special_tokens: Sequence[Any] | None = None,
        additional_special_tokens: Sequence[Any] | None = None,
        model_max_length: int | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_input_names: Sequence[str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        split_special_tokens: bool = False,
        chat_template: str | dict[str, str] | list[dict[str, str]] | None = None,
        chat_control_tokens: Sequence[str] | None = None,
        errors: str = "replace",
        add_prefix_space: bool | None = False,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        name_or_path: str = "",
        **unused: Any,
    ) -> None:
        """Settings common to both classes; then the named special tokens are made whole-matched."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side={truncation_side!r}; expected 'left' or 'right'")
        if add_prefix_space:
            raise ValueError("add_prefix_space=True is not supported by Qwen2 tokenizers (Qwen2 never sets it)")
        if add_bos_token or add_eos_token:
            raise ValueError("add_bos_token/add_eos_token=True are not supported: Qwen2 adds no BOS or EOS")
        if unused:
            logger.debug("%s ignores unknown settings %s", type(self).__name__, sorted(unused))
        self.name_or_path = str(name_or_path)
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_input_names = list(model_input_names or type(self).model_input_names)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.split_special_tokens = bool(split_special_tokens)
        self.errors = errors
        self.add_prefix_space = False
        self.add_bos_token = self.add_eos_token = False
        if isinstance(chat_template, (list, tuple)):
            chat_template = {entry["name"]: entry["template"] for entry in chat_template}
        self.chat_template = chat_template
        if chat_control_tokens is not None and not isinstance(chat_control_tokens, (list, tuple)):
            raise TypeError(f"chat_control_tokens must be a list of strings, got {chat_control_tokens!r}")
        self.chat_control_tokens = None if chat_control_tokens is None else list(chat_control_tokens)
        self.init_kwargs = {"name_or_path": self.name_or_path}

        self._added: dict[int, AddedToken] = {}
        self._add_with_ids(sorted(added_tokens, key=lambda item: item[0]))
        self._special_tokens: dict[str, str | None] = dict.fromkeys(self.SPECIAL_TOKENS_ATTRIBUTES)
        for name, value in (("bos_token", bos_token), ("eos_token", eos_token), ("unk_token", unk_token),
                            ("pad_token", pad_token), ("sep_token", sep_token), ("cls_token", cls_token),
                            ("mask_token", mask_token)):
            setattr(self, name, value)
        extras = extra_special_tokens if extra_special_tokens is not None else additional_special_tokens
        if isinstance(extras, dict):
            raise ValueError("extra_special_tokens as a dict of named tokens is not supported; pass a list")
        self._extra_special_tokens: list[str] = [str(t) for t in extras or ()]
        # As transformers' Qwen2Tokenizer does: every special token is matched whole and skippable.
        specials = [AddedToken(t, special=True, normalized=False) for t in self.all_special_tokens]
        self._add_added_tokens(specials)

    def _add_with_ids(self, entries: list[tuple[int, AddedToken]]) -> None:
        ids = self._register_added([token for _, token in entries])
        for (wanted, token), got in zip(entries, ids):
            if wanted != got:
                logger.warning("added token %r is listed with id %d but got id %d", token.content, wanted, got)
            self._added[got] = token
        self._added = dict(sorted(self._added.items()))
        self._on_added_tokens_changed()

    def _add_added_tokens(self, tokens: list[AddedToken]) -> int:
        """Add or update tokens; the count excludes tokens already present with identical flags."""
        current = {token.content: token for token in self._added.values()}
        fresh = [token for token in tokens if current.get(token.content) != token]
        if not fresh:
            return 0
        for token, index in zip(fresh, self._register_added(fresh)):
            self._added[index] = token
        self._added = dict(sorted(self._added.items()))
        self._on_added_tokens_changed()
        return len(fresh)

    # ---- special and added tokens --------------------------------------------------------------
    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self._extra_special_tokens)

    @extra_special_tokens.setter
    def extra_special_tokens(self, value: Sequence[Any]) -> None:
        self._extra_special_tokens = [str(t) for t in value]

    additional_special_tokens = extra_special_tokens

    @property
    def extra_special_tokens_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self._extra_special_tokens)

    additional_special_tokens_ids = extra_special_tokens_ids

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set (transformers 5 leaves the extra ones out)."""
        return {name: value for name, value in self._special_tokens.items() if value is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        seen: list[str] = []
        for token in [*self._special_tokens.values(), *self._extra_special_tokens]:
            if token is not None and token not in seen:
                seen.append(token)
        return seen

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(self._added)

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {token.content: index for index, token in self._added.items()}

    def get_added_vocab(self) -> dict[str, int]:
        return self.added_tokens_encoder

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._base_vocab())
        vocab.update(self.added_tokens_encoder)
        return vocab

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    def __len__(self) -> int:
        """Distinct tokens in the base vocabulary and the added tokens together."""
        base = self._base_vocab()
        return len(base) + sum(1 for token in self._added.values() if token.content not in base)

    def __bool__(self) -> bool:
        return True

    def add_tokens(self, new_tokens: Any, special_tokens: bool = False) -> int:
        """Add tokens matched whole in text; returns how many were new or changed."""
        if not new_tokens:
            return 0
        if not isinstance(new_tokens, (list, tuple)):
            new_tokens = [new_tokens]
        tokens = []
        for token in new_tokens:
            token = AddedToken.coerce(token, special=special_tokens)
            if special_tokens and not token.special:
                token = AddedToken(token.content, token.single_word, token.lstrip, token.rstrip, token.normalized, True)
            tokens.append(token)
        return self._add_added_tokens(tokens)

    def add_special_tokens(self, special_tokens_dict: dict[str, Any], replace_extra_special_tokens: bool = True) -> int:
        """Set named special tokens (`pad_token`, ...) or `extra_special_tokens`, adding them as needed."""
        if not special_tokens_dict:
            return 0
        special_tokens_dict = dict(special_tokens_dict)
        if "additional_special_tokens" in special_tokens_dict:
            special_tokens_dict.setdefault("extra_special_tokens", special_tokens_dict.pop("additional_special_tokens"))
        to_add: list[AddedToken] = []
        for key, value in special_tokens_dict.items():
            if key == "extra_special_tokens":
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"extra_special_tokens must be a list of tokens, got {value!r}")
                tokens = [AddedToken.coerce(t, special=True) if not isinstance(t, str)
                          else AddedToken(t, special=True, normalized=False) for t in value]
                if replace_extra_special_tokens:
                    self._extra_special_tokens = [t.content for t in tokens]
                else:
                    self._extra_special_tokens += [t.content for t in tokens if t.content not in self._extra_special_tokens]
                to_add += tokens
            elif key in self.SPECIAL_TOKENS_ATTRIBUTES:
                token = (AddedToken(value, special=True, normalized=False) if isinstance(value, str)
                         else AddedToken.coerce(value, special=True))
                setattr(self, key, token.content)
                to_add.append(token)
            else:
                raise ValueError(
                    f"{key!r} is not a special token name; use one of {self.SPECIAL_TOKENS_ATTRIBUTES + ['extra_special_tokens']}"
                )
        forced = [AddedToken(t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, True) for t in to_add]
        return self._add_added_tokens(forced)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str] | None) -> int | list[int] | None:
        """Ids of tokens (added tokens first); unknown tokens give `unk_token_id` (None for Qwen2)."""
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(token) for token in tokens]

    def _token_to_id(self, token: str) -> int | None:
        index = self.added_tokens_encoder.get(token) if self._added else None
        if index is None:
            index = self._model_token_to_id(token)
        if index is None and self.unk_token is not None and token != self.unk_token:
            return self._token_to_id(self.unk_token)
        return index

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> Any:
        """Token strings of ids; `skip_special_tokens` drops `all_special_ids`, as transformers does."""
        if isinstance(ids, int) or hasattr(ids, "__index__") and not hasattr(ids, "__len__"):
            return self._id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._id_to_token(int(i)) for i in _to_list(ids) if int(i) not in skip]

    def _id_to_token(self, index: int) -> str | None:
        token = self._added.get(index)
        return token.content if token is not None else self._model_id_to_token(index)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 0  # Qwen2 adds no BOS/EOS around sequences

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        return list(token_ids_0) + list(token_ids_1 or [])

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if index in special else 0 for index in token_ids_0]
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    @property
    def pad_token_type_id(self) -> int:
        return 0

    @property
    def max_len_single_sentence(self) -> int:
        return self.model_max_length

    @property
    def max_len_sentences_pair(self) -> int:
        return self.model_max_length

    # ---- encoding ------------------------------------------------------------------------------
    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs: Any) -> list[str]:
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
        if return_overflowing_tokens or return_offsets_mapping:
            raise NotImplementedError(
                "return_overflowing_tokens and return_offsets_mapping are not supported by qwen2's tokenizers"
            )
        if text is None and text_target is None:
            raise ValueError("You need to specify either `text` or `text_target`.")
        padding, truncation, max_length = resolve_strategies(
            padding, truncation, max_length, pad_to_multiple_of, self.model_max_length, self.pad_token is not None
        )
        common = dict(
            padding=padding, truncation=truncation, pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side, return_tensors=return_tensors, return_token_type_ids=return_token_type_ids,
            return_attention_mask=return_attention_mask, return_special_tokens_mask=return_special_tokens_mask,
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
        pad_to_multiple_of: int | None,
        padding_side: str | None,
        return_tensors: str | None,
        return_token_type_ids: bool | None,
        return_attention_mask: bool | None,
        return_special_tokens_mask: bool,
        return_length: bool,
        is_split_into_words: bool,
        split_special_tokens: bool,
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

        first_ids = self._encode_inputs(firsts, is_split_into_words, split_special_tokens)
        second_ids = self._encode_inputs(seconds, is_split_into_words, split_special_tokens) if seconds else None
        rows: dict[str, list[list[int]]] = {"input_ids": []}
        want_types = "token_type_ids" in self.model_input_names if return_token_type_ids is None else return_token_type_ids
        want_mask = "attention_mask" in self.model_input_names if return_attention_mask is None else return_attention_mask
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
        if return_special_tokens_mask:
            rows["special_tokens_mask"] = [[0] * len(ids) for ids in rows["input_ids"]]
        target = pad_length([len(ids) for ids in rows["input_ids"]], padding, max_length, pad_to_multiple_of)
        if target is not None:
            rows = pad_rows(rows, target, padding_side or self.padding_side, {
                "input_ids": self.pad_token_id, "token_type_ids": self.pad_token_type_id,
                "attention_mask": 0, "special_tokens_mask": 1,
            })
        if return_length:
            rows["length"] = [len(ids) for ids in rows["input_ids"]]
        if self.model_max_length < VERY_LARGE_INTEGER and max_length is None:
            for ids in rows["input_ids"]:
                if len(ids) > self.model_max_length:
                    logger.warning(
                        "Token indices sequence length is longer than the specified maximum sequence length for "
                        "this model (%d > %d). Running this sequence through the model will result in indexing "
                        "errors", len(ids), self.model_max_length,
                    )
                    break
        if not batched and return_tensors is None:
            single = {key: value[0] if key != "length" else value for key, value in rows.items()}
            return BatchEncoding(single, n_sequences=2 if seconds else 1)
        return BatchEncoding(rows, tensor_type=return_tensors, n_sequences=2 if seconds else 1)

    def _encode_inputs(self, inputs: list[Any], is_split_into_words: bool, split_special_tokens: bool) -> list[list[int]]:
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
        if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], (dict, BatchEncoding)):
            encoded_inputs = {key: [example[key] for example in encoded_inputs] for key in encoded_inputs[0].keys()}
        encoded_inputs = dict(encoded_inputs)
        main = self.model_input_names[0]
        if main not in encoded_inputs:
            raise ValueError(f"pad() needs {main!r} in its inputs, got {sorted(encoded_inputs)}")
        values = encoded_inputs[main]
        first = _first_leaf(values)
        if return_tensors is None and first is not None and not isinstance(first, (int, list, tuple)):
            return_tensors = "pt" if hasattr(first, "detach") else "np"
        encoded_inputs = {key: _to_list(value) for key, value in encoded_inputs.items()}
        values = encoded_inputs[main]
        padding, _, max_length = resolve_strategies(
            padding, False, max_length, pad_to_multiple_of, self.model_max_length, self.pad_token is not None
        )
        batched = bool(values) and isinstance(values[0], (list, tuple))
        rows = {key: (value if batched else [value]) for key, value in encoded_inputs.items()}
        want_mask = "attention_mask" in self.model_input_names if return_attention_mask is None else return_attention_mask
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

    # ---- decoding ------------------------------------------------------------------------------
    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str | list[str]:
        """Text of a sequence of ids (or a list of texts for a batch of sequences)."""
        token_ids = _to_list(token_ids)
        if isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        if isinstance(token_ids, list) and token_ids and isinstance(token_ids[0], list):
            return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in token_ids]
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if kwargs.get("clean_up_tokenization_spaces", self.clean_up_tokenization_spaces):
            logger.warning("Ignoring clean_up_tokenization_spaces=True for the byte-level BPE %s: it would "
                           "corrupt the text", type(self).__name__)
        ids = [int(i) for i in token_ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            for index in ids:
                if index < 0 or (index >= self.vocab_size and index not in self._added):
                    raise ValueError(
                        f"token id {index} is out of range: this tokenizer has ids 0..{len(self) - 1}"
                    )
        return self._decode_ids(ids, skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        sequences = _to_list(sequences)
        if not sequences:
            return []
        result = self.decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return [result] if isinstance(result, str) else result

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        from qwen2.tokenizer.bpe import token_to_bytes

        return b"".join(token_to_bytes(token) for token in tokens).decode("utf-8", errors=self.errors)

    def _skip_ids(self) -> set[int]:
        return {index for index, token in self._added.items() if token.special}

    # ---- chat templates ------------------------------------------------------------------------
    def get_chat_template(self, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
        from qwen2.tokenizer.chat import select_template

        return select_template(self.chat_template, chat_template, tools)

    def apply_chat_template(
        self,
        conversation: Any,
        tools: list[Any] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        sanitize_control_tokens: bool = False,
        padding: Any = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render a conversation with the checkpoint's Jinja template (sandboxed), and tokenize it.

        With `sanitize_control_tokens`, control tokens that appear in messages, tools, documents or template
        variables are encoded as plain text, so only the template's own control tokens become tokens.
        """
        from qwen2.tokenizer import chat

        if return_assistant_tokens_mask:
            raise NotImplementedError("return_assistant_tokens_mask is not supported by qwen2's tokenizers")
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ValueError("Cannot apply a chat template to an empty conversation: give at least one message")
        batched = isinstance(conversation, (list, tuple)) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        if sanitize_control_tokens:
            if not tokenize:
                raise ValueError("sanitize_control_tokens=True requires tokenize=True")
            controls = chat.control_tokens(template, self._added, self.chat_control_tokens)
            conversations = [chat.mark_control_tokens(chat.plain_data(c), controls) for c in conversations]
            tools, documents, kwargs = (chat.mark_control_tokens(v, controls) for v in (tools, documents, kwargs))
        rendered = chat.render_conversations(
            template, conversations, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **{**self.special_tokens_map, **kwargs},
        )
        text = rendered if batched else rendered[0]
        if not tokenize:
            return text
        if sanitize_control_tokens:
            out = self._encode_marked(rendered, batched, padding, truncation, max_length, return_tensors)
        else:
            out = self(text, padding=padding, truncation=truncation, max_length=max_length, add_special_tokens=False,
                       return_tensors=return_tensors, **(tokenizer_kwargs or {}))
        return out if return_dict else out["input_ids"]

    def _encode_marked(self, rendered: list[str], batched: bool, padding: Any, truncation: Any,
                       max_length: int | None, return_tensors: str | None) -> BatchEncoding:
        from qwen2.tokenizer.chat import encode_marked_chat

        padding, truncation, max_length = resolve_strategies(
            padding, truncation, max_length, None, self.model_max_length, self.pad_token is not None
        )
        rows = [encode_marked_chat(self, text) for text in rendered]
        if truncation != "do_not_truncate" and max_length is not None:
            rows = [truncate(ids, None, "longest_first", max_length, self.truncation_side)[0] for ids in rows]
        return self.pad({"input_ids": rows if batched or return_tensors else rows[0]}, padding=padding,
                        max_length=max_length, return_tensors=return_tensors)

    # ---- saving and loading --------------------------------------------------------------------
    def _config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "add_bos_token": self.add_bos_token,
            "add_prefix_space": False,
            "added_tokens_decoder": {str(i): token.to_dict() for i, token in self._added.items()},
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "errors": self.errors,
            "extra_special_tokens": list(self._extra_special_tokens),
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "split_special_tokens": self.split_special_tokens,
            "tokenizer_class": "Qwen2Tokenizer",
            "truncation_side": self.truncation_side,
        }
        if self.chat_control_tokens is not None:
            config["chat_control_tokens"] = list(self.chat_control_tokens)
        config.update(self._special_tokens)
        return config

    def save_vocabulary(self, save_directory: str | os.PathLike, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write vocab.json and merges.txt (the BPE model alone)."""
        raise NotImplementedError

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> tuple[str, ...]:
        """Write the tokenizer in transformers 5's layout; returns the paths written."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub is not supported; upload the saved directory with huggingface_hub")
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_directory {directory} is a file, not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"{filename_prefix}-" if filename_prefix else ""
        written = []
        config = self._config_dict()
        if isinstance(self.chat_template, str):
            path = directory / f"{stem}{files.CHAT_TEMPLATE_FILE}"
            path.write_text(self.chat_template, encoding="utf-8")
            written.append(str(path))
        elif isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        written.insert(0, files.write_json(directory / f"{stem}{files.CONFIG_FILE}", config))
        written += self._save_model_files(directory, filename_prefix)
        return tuple(written)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *init_inputs: Any,
        gguf_file: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> "Qwen2TokenizerBase":
        """Load from a local directory, a .gguf file, or a hub id (through `huggingface_hub`)."""
        for name in ("subfolder", "use_fast", "_from_auto", "_commit_hash", "proxies", "resume_download"):
            kwargs.pop(name, None)
        directory = Path(pretrained_model_name_or_path).expanduser()
        if not (directory.is_dir() and gguf_file is None):
            from qwen2.loading.hub import resolve_model_dir

            directory = Path(resolve_model_dir(
                pretrained_model_name_or_path, gguf_file=gguf_file, revision=revision, cache_dir=cache_dir,
                local_files_only=local_files_only, token=token,
                allow_patterns=[*files.TOKENIZER_FILES, "config.json"],
            ))
        config = files.read_config(directory)
        config.pop("tokenizer_class", None)
        config.pop("auto_map", None)
        config.update(kwargs)
        config.setdefault("name_or_path", str(pretrained_model_name_or_path))
        return cls._from_directory(directory, config)

    @classmethod
    def _from_directory(cls, directory: Path, config: dict[str, Any]) -> "Qwen2TokenizerBase":
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path='{self.name_or_path}', vocab_size={self.vocab_size}, "
            f"model_max_length={self.model_max_length}, is_fast={self.is_fast}, padding_side='{self.padding_side}', "
            f"truncation_side='{self.truncation_side}', special_tokens={self.special_tokens_map}, "
            f"added_tokens={len(self._added)})"
        )


def added_tokens_from_config(config: dict[str, Any]) -> list[tuple[int, AddedToken]]:
    """The `added_tokens_decoder` entries of a tokenizer config, as (id, AddedToken), checked."""
    entries = []
    for key, value in (config.pop("added_tokens_decoder", None) or {}).items():
        try:
            index = int(key)
        except ValueError:
            raise files.TokenizerFileError(f"added_tokens_decoder key {key!r} is not an integer id") from None
        if isinstance(value, str):
            value = {"content": value}
        if not isinstance(value, dict) or not isinstance(value.get("content"), str):
            raise files.TokenizerFileError(f"added_tokens_decoder[{key}] = {value!r} has no string 'content'")
        entries.append((index, AddedToken.coerce(value)))
    return entries


def _check_text(text: Any, is_split_into_words: bool, name: str) -> None:
    ok = isinstance(text, str) or (
        isinstance(text, (list, tuple))
        and all(isinstance(t, str) or (isinstance(t, (list, tuple)) and all(isinstance(w, str) for w in t)) for t in text)
    )
    if not ok:
        raise ValueError(
            f"{name} must be a str, a list of str (a batch, or one pre-split text with is_split_into_words=True) "
            f"or a list of lists of str; got {type(text).__name__}"
        )


def _to_list(value: Any) -> Any:
    """Python lists from tensors and arrays (what decode and pad accept)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_list(v) for v in value]
    return value


def _first_leaf(values: Any) -> Any:
    while isinstance(values, (list, tuple)):
        if not values:
            return None
        values = values[0]
    return values
