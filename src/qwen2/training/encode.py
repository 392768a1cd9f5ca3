"""Checked records -> token ids and training targets, one function per task.

- sft: the chat template is applied and only the assistant's tokens are learned. A template with
  `{% generation %}` blocks marks them itself (return_assistant_tokens_mask); for one without (Qwen2.5's own),
  the assistant spans are found by rendering the conversation turn by turn: what assistant turn i adds after the
  generation prompt, up to and including its end-of-turn token, is learned; the newline the template writes after
  that token is not (the span a `{% generation %}` block around the content and end token would give).
- classify: text (and text_pair) tokenized as one sequence; the label's index is the target.
- tag: the words tokenized with `is_split_into_words`; each word's first sub-token carries its tag, the other
  sub-tokens -100 (transformers' token-classification recipe).

Targets of sft are stored already shifted (target[t] is the token at t+1), so packed sequences never predict
across their boundary.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwen2.training.data import Dataset, DataError, Record

logger = logging.getLogger(__name__)

IGNORE = -100
TOO_LONG = ("truncate", "refuse")


@dataclass
class Example:
    """One tokenized example: ids, per-position targets (sft/tag; IGNORE where nothing is learned) or a label."""

    input_ids: list[int]
    targets: list[int] | None = None
    label: int | None = None

    @property
    def items(self) -> int:
        """What the loss is averaged over: learned positions, or 1 for a classified sequence."""
        return 1 if self.label is not None else sum(t != IGNORE for t in self.targets)


def has_generation_blocks(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def _render(tokenizer: Any, messages: list[dict], tools: Any, **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)


def assistant_spans(tokenizer: Any, messages: list[dict], tools: Any = None) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, character spans of the assistant turns) for a template without generation
    blocks. Raises ValueError if the template does not render a conversation's turns as prefixes of it."""
    text = _render(tokenizer, messages, tools)
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], tools, add_generation_prompt=True) if index else ""
        through = _render(tokenizer, messages[:index + 1], tools)
        if not (through.startswith(prompt) and text.startswith(through)):
            raise ValueError("the chat template does not render earlier turns as a prefix of the whole "
                             "conversation, so the assistant's tokens cannot be found by role: give a template "
                             "with {% generation %} blocks (--chat-template)")
        end = len(through.rstrip())  # the end-of-turn token is learned, the newline after it is not
        if end > len(prompt):
            spans.append((len(prompt), end))
    return text, spans


def _sft_ids_and_mask(tokenizer: Any, record: Record) -> tuple[list[int], list[int]]:
    messages, tools = record.fields["messages"], record.fields.get("tools")
    template = tokenizer.get_chat_template(None, tools)
    if has_generation_blocks(template):
        out = tokenizer.apply_chat_template(messages, tools=tools, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    from qwen2.tokenizer.chat import assistant_masks

    text, spans = assistant_spans(tokenizer, messages, tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), assistant_masks([encoded["offset_mapping"]], [spans])[0]


def encode_sft(tokenizer: Any, record: Record) -> Example:
    ids, mask = _sft_ids_and_mask(tokenizer, record)
    # target[t] = ids[t+1] where token t+1 is the assistant's.
    targets = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, targets=targets)


def encode_classify(tokenizer: Any, record: Record, label_ids: dict[str, int]) -> Example:
    fields = record.fields
    encoded = tokenizer(fields["text"], fields.get("text_pair"), add_special_tokens=False)
    return Example(list(encoded["input_ids"]), label=label_ids[fields["label"]])


def encode_tag(tokenizer: Any, record: Record, label_ids: dict[str, int]) -> Example:
    tags = record.fields["tags"]
    encoded = tokenizer(record.fields["tokens"], is_split_into_words=True, add_special_tokens=False)
    targets, previous = [], None
    for word in encoded.word_ids():
        targets.append(IGNORE if word is None or word == previous else label_ids[tags[word]])
        previous = word
    return Example(list(encoded["input_ids"]), targets=targets)


def _fit(example: Example, record: Record, task: str, max_length: int, too_long: str) -> Example | str:
    """The example cut to max_length, or the problem that refuses it."""
    field = {"sft": "messages", "classify": "text", "tag": "tokens"}[task]
    if len(example.input_ids) <= max_length:
        return example
    if too_long == "refuse":
        return f"{record.where(field)}: {len(example.input_ids)} tokens, more than --max-length {max_length}"
    example.input_ids = example.input_ids[:max_length]
    if example.targets is not None:
        example.targets = example.targets[:max_length]
        if task == "sft":
            example.targets[-1] = IGNORE  # its next token was cut off
        if example.items == 0:
            return f"{record.where(field)}: nothing left to learn within --max-length {max_length} tokens"
    return example


def encode_dataset(tokenizer: Any, dataset: Dataset, max_length: int, too_long: str = "truncate",
                   labels: Sequence[str] | None = None) -> list[Example]:
    """Tokenize every record of `dataset`; sequences longer than `max_length` are cut (and counted in the log)
    or, with too_long='refuse', reported as DataError. `labels` gives the label order (default: the dataset's)."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    label_ids = {name: index for index, name in enumerate(labels if labels is not None else dataset.labels)}
    examples, problems, cut = [], [], 0
    for record in dataset.records:
        try:
            if dataset.task == "sft":
                example = encode_sft(tokenizer, record)
            elif dataset.task == "classify":
                example = encode_classify(tokenizer, record, label_ids)
            else:
                example = encode_tag(tokenizer, record, label_ids)
        except KeyError as error:
            problems.append(f"{record.path}:{record.line}: label {error.args[0]!r} is not in the training labels")
            continue
        cut += len(example.input_ids) > max_length
        fitted = _fit(example, record, dataset.task, max_length, too_long)
        if isinstance(fitted, str):
            problems.append(fitted)
            continue
        examples.append(fitted)
    if problems:
        raise DataError(problems)
    if cut:
        logger.warning("%s: %d of %d examples were longer than --max-length %d tokens and were truncated",
                       dataset.records[0].path, cut, len(examples), max_length)
    return examples
