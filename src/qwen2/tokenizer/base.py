"""The base both Qwen2 tokenizers share, with transformers 5's semantics.

Reference: transformers' `tokenization_utils_base.py` and `tokenization_utils_tokenizers.py`
(`PreTrainedTokenizerBase`, `TokenizersBackend`). A subclass supplies the model: encoding text to
ids, decoding ids, the base vocabulary and how added tokens get ids. Everything users touch is
written once -- special tokens (`vocabulary.py`), `__call__`/padding/truncation (`calls.py`), and
here decoding, chat templates, saving and loading -- so the pure-Python and the `tokenizers`-backed
classes cannot drift apart.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qwen2.tokenizer import files
from qwen2.tokenizer.added import AddedToken
from qwen2.tokenizer.calls import EncodingMixin
from qwen2.tokenizer.encoding import BatchEncoding, to_python
from qwen2.tokenizer.padding import VERY_LARGE_INTEGER, resolve_strategies, truncate
from qwen2.tokenizer.vocabulary import VocabularyMixin


logger = logging.getLogger(__name__)


class Qwen2TokenizerBase(VocabularyMixin, EncodingMixin):
    """Shared behaviour of `Qwen2Tokenizer` and `Qwen2TokenizerFast`."""

    vocab_files_names = {"vocab_file": files.VOCAB_FILE, "merges_file": files.MERGES_FILE,
                         "tokenizer_file": files.TOKENIZER_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "right"
    truncation_side = "right"
    is_fast = False

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

    def _encode_aligned(self, texts: list[str], split_special_tokens: bool) -> list[Any]:
        """Like `_encode_texts`, as `alignment.Encoding`s: each token's character offsets and word."""
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
        self._warned_cleanup = False
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
        extras = extra_special_tokens if extra_special_tokens else additional_special_tokens
        if isinstance(extras, dict):  # named model-specific tokens, e.g. {"image_token": "<|image_pad|>"}
            self.SPECIAL_TOKENS_ATTRIBUTES = self.SPECIAL_TOKENS_ATTRIBUTES + list(extras)
            self._special_tokens.update({name: _token_text(token) for name, token in extras.items()})
            extras = additional_special_tokens
        self._extra_special_tokens: list[str] = [_token_text(t) for t in extras or ()]
        # As transformers' Qwen2Tokenizer does: every special token is matched whole and skippable.
        specials = [AddedToken(t, special=True, normalized=False) for t in self.all_special_tokens]
        self._add_added_tokens(specials)

    # ---- decoding ------------------------------------------------------------------------------
    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str | list[str]:
        """Text of a sequence of ids (or a list of texts for a batch of sequences)."""
        if isinstance(token_ids, Mapping):
            token_ids = token_ids["input_ids"]
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if token_ids and not isinstance(token_ids[0], int):
            token_ids = to_python(token_ids)
            if isinstance(token_ids[0], list):
                return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in token_ids]
        if kwargs.get("clean_up_tokenization_spaces", self.clean_up_tokenization_spaces) and not self._warned_cleanup:
            self._warned_cleanup = True
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
        sequences = to_python(sequences)
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

        if return_assistant_tokens_mask and not (return_dict and tokenize):
            raise ValueError("return_assistant_tokens_mask=True requires return_dict=True and tokenize=True")
        template = self.get_chat_template(chat_template, tools)
        spans: list[list[tuple[int, int]]] | None = None
        if return_assistant_tokens_mask:
            if continue_final_message:
                raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask")
            if sanitize_control_tokens:
                raise ValueError("sanitize_control_tokens is not compatible with return_assistant_tokens_mask")
            if not re.search(r"\{%-?\s*generation\s*-?%\}", template):
                logger.warning("return_assistant_tokens_mask=True, but the chat template has no {% generation %} "
                               "block: every token's mask is 0")
            spans = []
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
            continue_final_message=continue_final_message, generation_spans=spans,
            **{**self.special_tokens_map, **kwargs},
        )
        text = rendered if batched else rendered[0]
        if not tokenize:
            return text
        if sanitize_control_tokens:
            out = self._encode_marked(rendered, batched, padding, truncation, max_length, return_tensors)
        else:
            out = self(text, padding=padding, truncation=truncation, max_length=max_length, add_special_tokens=False,
                       return_tensors=return_tensors, **(tokenizer_kwargs or {}))
        if spans is not None:
            masks = chat.assistant_masks([e.offsets for e in out.encodings], spans)
            out["assistant_masks"] = masks if batched or return_tensors else masks[0]
            out.convert_to_tensors(return_tensors)
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


def _token_text(token: Any) -> str:
    """A token given as a string, an AddedToken or its serialised dict."""
    if isinstance(token, dict):
        return token["content"]
    return str(token)
