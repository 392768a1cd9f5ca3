"""Qwen2 decoder in plain PyTorch, with transformers' module names, forward signatures and numerics.

Reference: transformers' models/qwen2/modular_qwen2.py (the contract), masking_utils.py (mask semantics),
gpt-fast and mlx-lm qwen2.py (shape). Numerics policy: RMSNorm, softmax and rope tables in float32, results cast
back to the activation dtype; logits in the model dtype, as transformers returns them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwen2.activations import activation
from qwen2.cache import Cache, DynamicCache
from qwen2.config import Qwen2Config
from qwen2.generation import GenerationConfig, GenerationMixin
from qwen2.loading.pretrained import PreTrainedModel
from qwen2.losses import causal_lm_loss
from qwen2.masking import AttentionMask, build_mask, packed_segments
from qwen2.outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from qwen2.rope import Qwen2RotaryEmbedding

logger = logging.getLogger(__name__)


class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D) broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, D) -> (B, n_kv * n_rep, T, D), each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, n_rep, length, dim).reshape(batch, heads * n_rep, length, dim)


class Qwen2MLP(nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Qwen2Attention(nn.Module):
    """Grouped-query attention with q/k/v bias. SDPA by default; the eager path (softmax in float32) returns
    the attention probabilities and is used when they are requested or `config._attn_implementation == "eager"`."""

    def __init__(self, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.layer_type = config.layer_types[layer_idx]
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: AttentionMask,
        past_key_values: Cache | None = None,
        cache_position: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx, {"cache_position": cache_position})
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout = self.attention_dropout if self.training else 0.0
        if output_attentions or getattr(self.config, "_attn_implementation", None) == "eager":
            out, weights = self._eager(q, k, v, attention_mask, dropout)
        else:
            out, weights = self._sdpa(q, k, v, attention_mask, dropout), None
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), weights

    def _eager(self, q, k, v, attention_mask: AttentionMask, dropout: float):
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # (B, H, T, S)
        mask, is_causal = attention_mask
        if is_causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None and mask.dtype == torch.bool:
            # Fill rather than add the dtype's minimum: adding it to a negative float16 score overflows to -inf,
            # and a fully masked (padding) row of -inf turns into NaN that then spreads through the keys.
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        elif mask is not None:
            scores = scores + mask
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=self.training)
        return torch.matmul(weights, v), weights

    def _sdpa(self, q, k, v, attention_mask: AttentionMask, dropout: float) -> torch.Tensor:
        mask, is_causal = attention_mask
        groups = self.num_key_value_groups
        if groups > 1 and q.shape[2] == 1 and (mask is None or mask.shape[1] == 1):
            # Decode: fold each query group into the length axis, so keys/values are neither repeated nor sent
            # through SDPA's slow strided GQA path (the cache returns views of larger buffers).
            batch = q.shape[0]
            packed = q.reshape(batch, self.num_key_value_heads, groups, self.head_dim)
            if torch.compiler.is_compiling() and q.device.type == "cpu" and dropout == 0.0:
                out = _single_query_attention(packed, k, v, mask, self.scaling)
            else:
                out = F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, dropout_p=dropout,
                                                     scale=self.scaling)
            return out.reshape(batch, self.num_heads, 1, self.head_dim)
        if groups > 1 and mask is None:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=self.scaling, is_causal=is_causal, enable_gqa=True
            )
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling, is_causal=is_causal and mask is None
        )


def _single_query_attention(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Decode attention written out for torch.compile on the CPU: inductor fuses it into a few loops over
    the cache instead of 24 calls to SDPA's CPU kernel per token. q (B, Hkv, G, D), k/v (B, Hkv, S, D)."""
    q = q.float()
    q = q.as_strided(q.shape, q.stride())  # computed once, not once per key (see row_linear.row_matvec)
    scores = (q.unsqueeze(-2) * k.float().unsqueeze(2)).sum(-1) * scale  # (B, Hkv, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2).to(v.dtype)  # (B, Hkv, G, D)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: AttentionMask,
        past_key_values: Cache | None = None,
        cache_position: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, weights = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask,
            past_key_values,
            cache_position,
            output_attentions,
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, weights


class Qwen2PreTrainedModel(PreTrainedModel):
    config_class = Qwen2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer"]

    def post_init(self) -> None:
        """Initialise weights as transformers does (each module once, though heads nest a base model that ran
        its own post_init), then tie them. Skipped on the meta device, where the loader fills weights in."""
        if not any(p.is_meta for p in self.parameters()):
            for module in self.modules():
                if not getattr(module, "_weights_initialised", False):
                    self._init_weights(module)
                    module._weights_initialised = True
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Qwen2RotaryEmbedding):
            module.reset_tables()
        else:
            super()._init_weights(module)

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (rope frequencies) on the device the parameters now live on."""
        device = next(self.parameters()).device
        for module in self.modules():
            if isinstance(module, Qwen2RotaryEmbedding):
                module.reset_tables(device)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, value: nn.Module) -> None:
        if hasattr(self, "lm_head"):
            self.lm_head = value

    def tie_weights(self) -> None:
        """Share lm_head.weight with embed_tokens.weight when `config.tie_word_embeddings`."""
        output = self.get_output_embeddings()
        if output is not None and getattr(self.config, "tie_word_embeddings", False):
            output.weight = self.get_input_embeddings().weight

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute decoder layers in backward instead of storing their activations, as transformers 5.x does:
        every `every_n_layers`-th layer, non-reentrant by default, the saved layer inputs kept on the CPU with
        `offload`; the input embeddings' output is made to require grad so frozen embeddings (LoRA) still work."""
        if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        kwargs = {"use_reentrant": False} if activation_checkpointing_kwargs is None \
            else dict(activation_checkpointing_kwargs)
        for module in self.modules():
            if isinstance(module, Qwen2Model):
                module.gradient_checkpointing = True
                module._checkpoint_kwargs = kwargs
                module._checkpoint_every = every_n_layers
                module._checkpoint_offload = offload
        self.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                      **kwargs: Any) -> None:
        """The older name of `activation_checkpointing_enable` (transformers.Trainer still calls it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, Qwen2Model):
                module.gradient_checkpointing = False

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    is_activation_checkpointing = is_gradient_checkpointing

    def set_attn_implementation(self, attn_implementation: str) -> None:
        """"sdpa" (default) or "eager" (always materialise attention probabilities), as in transformers."""
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation={attn_implementation!r} is not supported; use 'sdpa' or 'eager'.")
        self.config._attn_implementation = attn_implementation


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def _flag(value: bool | None, config: Any, name: str, default: bool = False) -> bool:
    return bool(getattr(config, name, default)) if value is None else bool(value)


def _return_dict(value: bool | None, config: Any) -> bool:
    if value is not None:
        return value
    return bool(getattr(config, "use_return_dict", getattr(config, "return_dict", True)))


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """An id outside the embedding table is a caller's error, not an IndexError deep in torch."""
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids holds ids outside the vocabulary [0, {vocab_size}): min {int(input_ids.min())}, "
                         f"max {int(input_ids.max())}")


def _pick_cache(past_key_values: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    """Accept transformers 5.x's `cache=` as well as `past_key_values=`."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass either `past_key_values` or `cache`, not both.")
    return past_key_values if cache is None else cache


class Qwen2Model(Qwen2PreTrainedModel):
    """The decoder stack: embeddings, layers, final norm. Returns the normed hidden states (and the cache)."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self._checkpoint_kwargs: dict[str, Any] = {"use_reentrant": False}
        self._checkpoint_every = 1
        self._checkpoint_offload = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        cache = _pick_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        output_attentions = _flag(output_attentions, self.config, "output_attentions")
        output_hidden_states = _flag(output_hidden_states, self.config, "output_hidden_states")
        use_cache = _flag(use_cache, self.config, "use_cache", True)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and (use_cache or cache is not None):
            _warn_once("Caching is incompatible with gradient checkpointing: running without a cache.")
            use_cache, cache = False, None

        if inputs_embeds is None:
            if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():  # no sync, no graph break
                _check_ids(input_ids, self.embed_tokens.num_embeddings)
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        elif isinstance(cache, DynamicCache):
            cache._configure(self.config)
        if cache_position is None:
            past = cache.get_seq_length() if cache is not None else 0
            cache_position = torch.arange(past, past + length, device=inputs_embeds.device)
        detect_packing = position_ids is not None and attention_mask is None and cache is None
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)

        masks = self._masks(attention_mask, cache, cache_position, position_ids if detect_packing else None, batch)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden: list[torch.Tensor] = []
        all_attentions: list[torch.Tensor | None] = []
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            args = (position_embeddings, masks[layer.self_attn.layer_type], cache, cache_position, output_attentions)
            if checkpointing and index % self._checkpoint_every == 0:
                offload = torch.autograd.graph.save_on_cpu(pin_memory=hidden_states.is_cuda) \
                    if self._checkpoint_offload else contextlib.nullcontext()
                with offload:
                    hidden_states, weights = checkpoint(layer, hidden_states, *args, **self._checkpoint_kwargs)
            else:
                hidden_states, weights = layer(hidden_states, *args)
            if output_attentions:
                all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if _return_dict(return_dict, self.config) else output.to_tuple()

    def _masks(
        self,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        cache_position: torch.Tensor,
        packed_position_ids: torch.Tensor | None,
        batch: int,
    ) -> dict[str, AttentionMask]:
        """One mask per layer type; all layers of a type see the same key positions."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return {kind: (attention_mask, False) for kind in set(self.config.layer_types)}
        segments = packed_segments(packed_position_ids, batch) if packed_position_ids is not None else None
        masks: dict[str, AttentionMask] = {}
        for index, kind in enumerate(self.config.layer_types):
            if kind in masks:
                continue
            window = self.config.sliding_window if kind == "sliding_attention" else None
            if cache is None:
                kv_positions, is_prefix = cache_position, True
            else:
                kv_positions, is_prefix = cache.kv_positions(index, cache_position)
            masks[kind] = build_mask(kv_positions, is_prefix, cache_position, attention_mask, window, segments)
        return masks


def _slice_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden_states[logits_to_keep]
        return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
    return hidden_states[:, logits_to_keep, :]


class Qwen2ForCausalLM(Qwen2PreTrainedModel, GenerationMixin):
    """Decoder + lm_head; `generate()` comes from GenerationMixin."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # transformers.Trainer reads it: "ForCausalLM" makes it count `num_items_in_batch` over the shifted labels.
    loss_type = "ForCausalLM"

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = GenerationConfig.from_model_config(config)
        self.post_init()

    def get_decoder(self) -> Qwen2Model:
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        cache = _pick_cache(past_key_values, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        logits = self.lm_head(_slice_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if _return_dict(return_dict, self.config) else output.to_tuple()


def __getattr__(name: str) -> Any:
    # The classification/QA heads live in qwen2.heads (which imports this module); re-export them lazily.
    if name in ("Qwen2ForSequenceClassification", "Qwen2ForTokenClassification", "Qwen2ForQuestionAnswering"):
        from qwen2 import heads

        return getattr(heads, name)
    raise AttributeError(f"module 'qwen2.model' has no attribute {name!r}")
