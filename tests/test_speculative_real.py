"""Speculative decoding on the real default model: prompt-lookup greedy output equals plain greedy, token for
token, on 20 chat prompts (code edits, whose answers copy their prompt: long accepted drafts and a rollback where
the edit departs from it; and open questions, among them the seed prompt, where int8 and int4 once parted from
plain greedy at a near-tie in the second token) for bf16, int8 and int4.

Eager on both sides: compiling the real model's step and verification would cost about a minute; the compiled
verification's rows are checked against the compiled step bit for bit on a tiny model (test_speculative.py).
One GGUF load (int8 and int4 are quantised from the bf16 model) and few new tokens keep it within the CI budget."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen2.generation.speculative import last_speculation_stats

_FUNCTION = '''def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
'''
_CLASS = '''class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
'''
PROMPTS = [
    f"Rename `values` to `numbers` in this function:\n```python\n{_FUNCTION}```",
    f"Add a docstring to this function:\n```python\n{_FUNCTION}```",
    f"Add type hints to this function:\n```python\n{_FUNCTION}```",
    f"Make this function return 0 for an empty list:\n```python\n{_FUNCTION}```",
    f"Add a `peek` method to this class:\n```python\n{_CLASS}```",
    f"Rename the class to `LifoStack`:\n```python\n{_CLASS}```",
    f"Add a `__len__` method to this class:\n```python\n{_CLASS}```",
    "Rewrite with a list comprehension: ```python\nsquares = []\nfor i in range(10):\n    squares.append(i * i)\n```",
    "Fix the bug: ```python\ndef is_even(n):\n    return n % 2 == 1\n```",
    "Convert to an f-string: ```python\nprint('Hello, ' + name + '! You are ' + str(age))\n```",
    "Give me a short introduction to large language model.",
    "Write a Python function that reverses a string.",
    "What is a Python decorator? One sentence.",
    "List three sorting algorithms.",
    "Translate 'good morning' into French.",
    "What does HTTP stand for?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "What is 17 times 23?",
    "Name the planets of the solar system.",
]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    import qwen2

    return qwen2.AutoTokenizer.from_pretrained(str(default_gguf))


@pytest.fixture(scope="module")
def bf16_model(default_gguf):
    import qwen2

    return qwen2.Qwen2ForCausalLM.from_pretrained(str(default_gguf), dtype=torch.bfloat16).eval()


def _chat(tokenizer, text: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [None, "int8", "int4"], ids=["bf16", "int8", "int4"])
def test_prompt_lookup_greedy_equals_plain_greedy_on_the_real_model(bf16_model, tokenizer, scheme):
    from qwen2.quantization import quantize_model

    model = bf16_model if scheme is None else quantize_model(copy.deepcopy(bf16_model), scheme)
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, disable_compile=True)
    accepted = 0
    for text in PROMPTS:
        ids = _chat(tokenizer, text)
        plain = model.generate(ids, **options)
        speculative = model.generate(ids, prompt_lookup_num_tokens=8, **options)
        accepted += last_speculation_stats().accepted
        assert speculative.tolist() == plain.tolist(), text
    assert accepted > 10  # the code edits copy their prompt: drafts were accepted, not just tried
