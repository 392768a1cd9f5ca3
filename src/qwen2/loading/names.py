"""The one map between GGUF (llama.cpp) tensor names and ours, which are transformers' names.

Our module attributes are transformers' state-dict names, so a transformers checkpoint needs no
renaming at all; only GGUF files do, through `GGUF_TO_HF` below (llama.cpp's `tensor_mapping.py`
for the qwen2 architecture, read the other way round).

No q/k permutation is needed for Qwen2. llama.cpp's `convert_hf_to_gguf.py` permutes q_proj/k_proj
only for the LLaMA family, whose ggml graph uses interleaved ("NORM") rotary pairs while the HF
weights assume rotate-half pairs; llama.cpp runs qwen2 with NEOX-style rotate-half RoPE, the same
layout as transformers, so its converter stores Qwen2's q/k rows unchanged. transformers' GGUF loader
agrees: it reverses the permutation only for `llama` (`LlamaTensorProcessor`), never for qwen2, and
our tests compare every dequantised tensor, q/k included, with its load of the real file.
"""

from __future__ import annotations

import re

# `{}` is the layer index.
GGUF_TO_HF: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
HF_TO_GGUF: dict[str, str] = {hf: gguf for gguf, hf in GGUF_TO_HF.items()}

_GGUF_LAYER = re.compile(r"blk\.(0|[1-9]\d*)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(0|[1-9]\d*)\.(.+)")


def _translate(name: str, table: dict[str, str], layer: re.Pattern[str], prefix: str) -> str | None:
    if name in table:
        return table[name]
    match = layer.fullmatch(name)
    if match is None:
        return None
    template = table.get(f"{prefix}.{{}}.{match.group(2)}")
    return None if template is None else template.format(match.group(1))


def gguf_to_hf(name: str) -> str | None:
    """Our (transformers') name for a GGUF tensor, or None for a tensor Qwen2 does not use."""
    return _translate(name, GGUF_TO_HF, _GGUF_LAYER, "blk")


def hf_to_gguf(name: str) -> str | None:
    """The GGUF name of one of our parameters, or None if GGUF has no such tensor."""
    return _translate(name, HF_TO_GGUF, _HF_LAYER, "model.layers")

