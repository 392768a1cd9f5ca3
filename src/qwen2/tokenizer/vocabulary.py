"""Special and added tokens, and token <-> id conversion, with transformers 5's semantics.

Reference: transformers' `tokenization_utils_base.py` (special token attributes, `add_tokens`,
`add_special_tokens`) and `tokenization_utils_tokenizers.py` (how `tokenizers` numbers added tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from qwen2.tokenizer import files
from qwen2.tokenizer.added import AddedToken
from qwen2.tokenizer.encoding import to_python

logger = logging.getLogger(__name__)

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _special_property(name: str) -> property:
    def get(self: "VocabularyMixin") -> str | None:
        value = self._special_tokens[name]
        return None if value is None else str(value)

    def set_(self: "VocabularyMixin", value: str | AddedToken | None) -> None:
        if value is not None and not isinstance(value, str) and not hasattr(value, "content"):
            raise ValueError(f"{name} must be a string or an AddedToken, got {type(value).__name__}")
        self._special_tokens[name] = None if value is None else str(value)

    return property(get, set_, doc=f"The {name.replace('_', ' ')} as a string, or None when unset.")


def _special_id_property(name: str) -> property:
    def get(self: "VocabularyMixin") -> int | None:
        token = self._special_tokens[name]
        return None if token is None else self.convert_tokens_to_ids(token)

    def set_(self: "VocabularyMixin", value: int | None) -> None:
        self._special_tokens[name] = None if value is None else self.convert_ids_to_tokens(int(value))

    return property(get, set_, doc=f"The id of the {name.replace('_', ' ')}, or None when unset.")


class VocabularyMixin:
    """The added-token registry (`self._added`) and special tokens of a Qwen2 tokenizer."""

    SPECIAL_TOKENS_ATTRIBUTES = list(SPECIAL_TOKENS_ATTRIBUTES)
    _added: dict[int, AddedToken]
    _special_tokens: dict[str, str | None]
    _extra_special_tokens: list[str]

    for _name in SPECIAL_TOKENS_ATTRIBUTES:
        locals()[_name] = _special_property(_name)
        locals()[f"{_name}_id"] = _special_id_property(_name)
    del _name

    def __getattr__(self, name: str) -> Any:
        """Named model-specific special tokens (`image_token`, `image_token_id`) from extra_special_tokens."""
        tokens = self.__dict__.get("_special_tokens", {})
        if name in tokens:
            return tokens[name]
        if name.endswith("_id") and name[:-3] in tokens:
            return self.convert_tokens_to_ids(tokens[name[:-3]])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
                    known = self._extra_special_tokens
                    self._extra_special_tokens = known + [t.content for t in tokens if t.content not in known]
                to_add += tokens
            elif key in self.SPECIAL_TOKENS_ATTRIBUTES:
                token = (AddedToken(value, special=True, normalized=False) if isinstance(value, str)
                         else AddedToken.coerce(value, special=True))
                setattr(self, key, token.content)
                to_add.append(token)
            else:
                raise ValueError(
                    f"{key!r} is not a special token name; use one of "
                    f"{self.SPECIAL_TOKENS_ATTRIBUTES + ['extra_special_tokens']}"
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
        return [self._id_to_token(int(i)) for i in to_python(ids) if int(i) not in skip]

    def _id_to_token(self, index: int) -> str | None:
        token = self._added.get(index)
        return token.content if token is not None else self._model_id_to_token(index)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 0  # Qwen2 adds no BOS/EOS around sequences

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
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


def added_tokens_from_config(config: dict[str, Any]) -> list[tuple[int, AddedToken]]:
    """The `added_tokens_decoder` entries of a tokenizer config, as (id, AddedToken), checked."""
    entries = []
    for key, value in (config.pop("added_tokens_decoder", None) or {}).items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise files.TokenizerFileError(f"added_tokens_decoder key {key!r} is not an integer id") from None
        if index < 0:
            raise files.TokenizerFileError(f"added_tokens_decoder key {key!r} is a negative id")
        if isinstance(value, str):
            value = {"content": value}
        if not isinstance(value, dict) or not isinstance(value.get("content"), str):
            raise files.TokenizerFileError(f"added_tokens_decoder[{key}] = {value!r} has no string 'content'")
        entries.append((index, AddedToken.coerce(value)))
    return entries

