"""Helpers of the fine-tuning tests: data files written by the tests, tiny random models on the real
tokenizer's vocabulary, and a generation-marked copy of Qwen2.5's chat template (transformers' oracle for
the assistant mask)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import qwen2

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


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
