"""Helpers of the fine-tuning tests: data files written by the tests, tiny random models on the real
tokenizer's vocabulary, and a generation-marked copy of Qwen2.5's chat template (transformers' oracle for
the assistant mask)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import qwen2

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine their barriers cost 10x (import it into a
    test module to apply it there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tokenizer, **extra) -> qwen2.Qwen2Config:
    return qwen2.Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **{**TINY, **extra})


def tiny_model(cls, tokenizer, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return cls(tiny_config(tokenizer, **extra))


_ASSISTANT_PLAIN = re.escape(
    """{%- if (message.role == "user") or (message.role == "system" and not loop.first) or """
    """(message.role == "assistant" and not message.tool_calls) %}""")
_USER_SYSTEM = """{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
    {%- elif false %}"""
_TOOL_CALLS = """{%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant\\n' }}{% generation %}
        {%- if message.content %}{{- message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}
            {{- '<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
    {%- elif message.role == "tool" %}"""


def generation_template(template: str) -> str:
    """Qwen2.5's template with {% generation %} around each assistant turn's text and end-of-turn token:
    it renders the same text, and transformers' return_assistant_tokens_mask reads the blocks."""
    marked = re.sub(_ASSISTANT_PLAIN, lambda m: _USER_SYSTEM, template, count=1)
    marked = re.sub(r"""\{%- elif message\.role == "assistant" %\}.*?\{%- elif message\.role == "tool" %\}""",
                    lambda m: _TOOL_CALLS, marked, count=1, flags=re.S)
    assert marked.count("{% generation %}") == 2, "the Qwen2.5 template changed: update the test's marking"
    return marked


def arithmetic_chats(count: int, offset: int = 0) -> list[dict]:
    """A learnable sft task: the answer is the question's number plus one."""
    return [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": f"{i} plus one is {i + 1}."}]}
            for i in range(offset, offset + count)]


POSITIVE = ["good", "great", "lovely", "excellent", "wonderful", "fine"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "poor", "dull"]


def sentiment_rows(subjects: list[str]) -> list[dict]:
    """Templated sentences whose label is the sentiment of their last word."""
    return [{"text": f"The {subject} was {word}", "label": label}
            for subject in subjects for words, label in ((POSITIVE, "pos"), (NEGATIVE, "neg")) for word in words]


def number_tag_rows(count: int, seed: int) -> list[dict]:
    """Sentences whose number words are tagged B-NUM (I-NUM for the second word of 'twenty one')."""
    import random

    rng = random.Random(seed)
    words = ["the", "cat", "saw", "a", "dog", "and", "ran", "home", "with", "we", "ate"]
    numbers = ["one", "two", "three", "four", "five", "six", "seven", "ten"]
    rows = []
    for _ in range(count):
        tokens, tags = [], []
        for _ in range(rng.randint(4, 7)):
            if rng.random() < 0.3:
                if rng.random() < 0.3:
                    tokens += ["twenty", rng.choice(numbers)]
                    tags += ["B-NUM", "I-NUM"]
                else:
                    tokens.append(rng.choice(numbers))
                    tags.append("B-NUM")
            else:
                tokens.append(rng.choice(words))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows
