"""Speculative decoding on the real default model: prompt-lookup greedy output equals plain greedy, token for
token, on 20 chat prompts (code edits among them) for bf16, int8 and int4 (fewer prompts for int4: its eager
several-row path is the slowest). Few new tokens each, so the three models stay within seconds."""

from __future__ import annotations

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
    "Fix the bug: ```python\ndef is_even(n):\n    return n % 2 == 1\n```",
    "Rewrite with a list comprehension: ```python\nsquares = []\nfor i in range(10):\n    squares.append(i * i)\n```",
    "Convert to an f-string: ```python\nprint('Hello, ' + name + '! You are ' + str(age))\n```",
    "Write a Python function that reverses a string.",
    "What is a Python decorator? One sentence.",
    "Give me a short introduction to large language model.",
    "List three sorting algorithms.",
    "Translate 'good morning' into French.",
    "What does HTTP stand for?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "What is 17 times 23?",
    "Name the planets of the solar system.",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def chats(default_gguf):
    import qwen2

    tokenizer = qwen2.AutoTokenizer.from_pretrained(str(default_gguf))
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"] for text in PROMPTS]


@pytest.mark.slow
@pytest.mark.parametrize("scheme, count", [(None, 8), ("int8", 20), ("int4", 8)], ids=["bf16", "int8", "int4"])
def test_prompt_lookup_greedy_equals_plain_greedy_on_the_real_model(default_gguf, chats, scheme, count):
    import qwen2

    model = qwen2.Qwen2ForCausalLM.from_pretrained(str(default_gguf), dtype=torch.bfloat16, quantization=scheme)
    accepted = 0
    for ids in chats[:count]:
        options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, disable_compile=True)
        plain = model.generate(ids, **options)
        speculative = model.generate(ids, prompt_lookup_num_tokens=8, **options)
        accepted += last_speculation_stats().accepted
        assert speculative.tolist() == plain.tolist()
    assert accepted > count  # the code edits copy their prompt: drafts were accepted, not just tried
