"""Speculative decoding on the real default model: prompt-lookup greedy output equals plain greedy, token for
token, for bf16, int8 and int4.

Eager on both sides: compiling the real model's step and verification would cost about a minute; the compiled
verification's rows are checked against the compiled step bit for bit on a tiny model (test_speculative.py).
Kept within the CI budget by choosing code edits, whose answers copy the prompt (long accepted drafts, and a
rollback where the edit departs from it), rather than many prompts, and by one GGUF load (int8 and int4 are
quantised from the bf16 model). The eager verification is not exact at a near-tie: on "Give me a short
introduction to large language model." (int8 and int4 quantised from bf16) its second token went the other way
(README), so no near-tie prompt is here."""

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
CODE_EDITS = [
    f"Rename `values` to `numbers` in this function:\n```python\n{_FUNCTION}```",
    f"Add a docstring to this function:\n```python\n{_FUNCTION}```",
    f"Add type hints to this function:\n```python\n{_FUNCTION}```",
    f"Make this function return 0 for an empty list:\n```python\n{_FUNCTION}```",
    f"Add a `peek` method to this class:\n```python\n{_CLASS}```",
    f"Rename the class to `LifoStack`:\n```python\n{_CLASS}```",
    f"Add a `__len__` method to this class:\n```python\n{_CLASS}```",
    "Rewrite with a list comprehension: ```python\nsquares = []\nfor i in range(10):\n    squares.append(i * i)\n```",
]
NEW_TOKENS = 10
SCHEMES = {None: 4, "int8": len(CODE_EDITS), "int4": 4}  # code edits per scheme


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
@pytest.mark.parametrize("scheme", list(SCHEMES), ids=["bf16", "int8", "int4"])
def test_prompt_lookup_greedy_equals_plain_greedy_on_the_real_model(bf16_model, tokenizer, scheme):
    from qwen2.quantization import quantize_model

    model = bf16_model if scheme is None else quantize_model(copy.deepcopy(bf16_model), scheme)
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, disable_compile=True)
    accepted = 0
    for text in CODE_EDITS[:SCHEMES[scheme]]:
        ids = _chat(tokenizer, text)
        plain = model.generate(ids, **options)
        speculative = model.generate(ids, prompt_lookup_num_tokens=8, **options)
        accepted += last_speculation_stats().accepted
        assert speculative.tolist() == plain.tolist(), text
    assert accepted > SCHEMES[scheme]  # the code edits copy their prompt: drafts were accepted, not just tried
