"""Structured output: decoding constrained to a JSON schema, a regex, a Lark grammar or a list of choices.

Built on `llguidance` (the optional extra `qwen2[structured]`), the grammar engine vLLM, SGLang and llama.cpp
use: it computes the set of tokens that keep the output inside the grammar, per step, in tens of microseconds.
`ConstrainedLogitsProcessor` plugs into `generate(logits_processor=[...])` (or `generate(json_schema=...)`);
`compile_constraint` gives the per-sequence `Constraint` a serving engine drives itself.
"""

from qwen2.constrained.constraint import (Constraint, apply_bitmask, apply_bitmask_, compile_constraint, fill_bitmask,
                                          new_bitmask)
from qwen2.constrained.grammar import compile_grammar
from qwen2.constrained.processor import ConstrainedLogitsProcessor

__all__ = [
    "ConstrainedLogitsProcessor",
    "Constraint",
    "apply_bitmask",
    "apply_bitmask_",
    "compile_constraint",
    "compile_grammar",
    "fill_bitmask",
    "new_bitmask",
]
