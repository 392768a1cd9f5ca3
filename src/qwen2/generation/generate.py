"""`GenerationMixin.generate`: transformers' `generate()` for decoder-only Qwen2 models.

Follows transformers 5.24 (`generation/utils.py`): arguments are merged as call kwargs > `generation_config`
argument > the model's `generation_config` > library defaults; prompts are left-padded with an attention
mask and positions come from the mask; logits processors and stopping criteria are those of
`logits.py`/`stopping.py`; finished rows are padded with `pad_token_id` (or the first eos id).

The greedy/sampling loop is a generator (`_decode_steps`) yielding one token per row per step, so streaming
is the primitive: `generate()` collects it, `generate_stream()` exposes it. All model calls of the loop go
through `_prefill` and the callable `_decode_step_fn` returns (by default `_decode_step`: one token per row,
static-shape inputs and cache), the seam where a compiled decode step plugs in. The loop's only host
sync per step is the "all rows finished?" check (plus the token copy when streaming or stop strings
are used).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwen2.generation.api import GenerationApiMixin
from qwen2.generation.beam import beam_search
from qwen2.generation.config import DEFAULT_GENERATION_PARAMS, GenerationConfig, check_attention_mask
from qwen2.generation.fast import cache_length, decode_step_fn
from qwen2.generation.logits import LogitsProcessor, apply_processors, build_logits_processors, check_supported
from qwen2.generation.outputs import GenerateDecoderOnlyOutput
from qwen2.generation.prompt import cached_length, extend_user_cache, seed_cache, take_prompt_embeds
from qwen2.generation.speculative import check_speculation, speculative_steps
from qwen2.generation.step_outputs import step_outputs
from qwen2.generation.stopping import EosToken, MaxLength, MaxTime, StoppingCriterion, StopStrings, any_done

logger = logging.getLogger(__name__)

# Prompts longer than this are prefilled in pieces unless `prefill_chunk_size` says otherwise: the MLP's
# (tokens, intermediate_size) activations stay ~60 MB instead of growing with the prompt; the keys each
# piece attends to are the same, so the result is unchanged.
_DEFAULT_PREFILL_CHUNK = 2048

# Structured output (qwen2.constrained): the answer is constrained to a JSON schema, a regex or a Lark grammar.
_CONSTRAINT_ARGUMENTS = ("json_schema", "regex", "grammar")

# generate() arguments of the reference that this implementation does not provide.
_UNSUPPORTED_ARGUMENTS = (
    "synced_gpus", "negative_prompt_ids",
    "negative_prompt_attention_mask", "custom_generate", "assistant_tokenizer",
)


@dataclass
class GenerationPlan:
    """Everything the decode loops need, resolved and validated once per generate() call."""

    config: GenerationConfig
    input_ids: torch.Tensor  # (N, L), already expanded for beams / return sequences
    attention_mask: torch.Tensor | None  # (N, L); None when nothing is padded
    position_ids: torch.Tensor  # (N, L)
    processors: list[LogitsProcessor]
    criteria: list[StoppingCriterion]
    eos_token_id: torch.Tensor | None  # (E,)
    pad_token_id: torch.Tensor | None  # ()
    generator: torch.Generator | None
    inputs_embeds: torch.Tensor | None = None  # (N, L, hidden): the prompt as embeddings (input_ids may be empty)
    user_cache: Any = None  # the cache passed as past_key_values, holding the first `cached_length` positions
    cached_length: int = 0

    @property
    def prefill_length(self) -> int:
        """Prompt positions the model runs (or finds cached): the embeddings' length when given."""
        return self.input_ids.shape[1] if self.inputs_embeds is None else self.inputs_embeds.shape[1]


@dataclass
class DecodeStep:
    tokens: torch.Tensor  # (N,) the token each row got this step (pad for finished rows)
    scores: torch.Tensor  # (N, V) processed scores the token was chosen from
    logits: torch.Tensor  # (N, V) raw float32 logits
    cache: Any


class GenerationMixin(GenerationApiMixin):
    """Adds transformers' `generate()` to a causal LM whose forward takes transformers' arguments."""

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: Sequence[LogitsProcessor] | None = None,
        stopping_criteria: Sequence[StoppingCriterion] | None = None,
        streamer: Any = None,
        *,
        tokenizer: Any = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """Prompt + new tokens, shape (batch * num_return_sequences, length), as transformers returns them.

        Extra arguments: `tokenizer` (needed for `stop_strings` and the constraints), `json_schema`, `regex` or
        `grammar` (Lark) to constrain the answer (see qwen2.constrained), and `generator` (a torch.Generator) or
        `seed` for sampling that does not touch (or depend on) the global RNG. Speculative decoding:
        `prompt_lookup_num_tokens` or `assistant_model` (see qwen2.generation.speculative).
        """
        assistant = kwargs.pop("assistant_model", None)
        _refuse_constrained_speculation(generation_config, assistant, kwargs)
        plan = self._plan_generation(inputs, generation_config, logits_processor, stopping_criteria,
                                     tokenizer, generator, seed, kwargs)
        config = plan.config
        steps = self._steps(plan, assistant)
        if config.num_beams > 1:
            if streamer is not None:
                raise ValueError("`streamer` cannot be used with beam search. Set `num_beams=1` to stream.")
            return beam_search(self, plan)

        record_scores = bool(config.return_dict_in_generate and config.output_scores)
        record_logits = bool(config.return_dict_in_generate and config.output_logits)
        tokens: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        raw_logits: list[torch.Tensor] = []
        cache = None
        if streamer is not None:
            streamer.put(plan.input_ids.cpu())
        try:
            for step in steps:
                tokens.append(step.tokens)
                cache = step.cache
                if record_scores:
                    scores.append(step.scores)
                if record_logits:
                    raw_logits.append(step.logits)
                if streamer is not None:
                    streamer.put(step.tokens.cpu())
        finally:
            if streamer is not None:
                streamer.end()
        sequences = torch.cat([plan.input_ids, torch.stack(tokens, dim=1)], dim=1)
        if not config.return_dict_in_generate:
            return sequences
        hidden_states = attentions = None
        if config.output_hidden_states or config.output_attentions:
            hidden_states, attentions = step_outputs(self, plan, sequences, bool(config.output_hidden_states),
                                                     bool(config.output_attentions))
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=tuple(scores) if record_scores else None,
            logits=tuple(raw_logits) if record_logits else None,
            attentions=attentions,
            hidden_states=hidden_states,
            cache=cache,
        )

    @torch.no_grad()
    def generate_stream(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Yield the (batch,) new tokens of each step as they are decoded (greedy or sampling).

        Takes the same arguments as `generate()`; the concatenation of what it yields is exactly the
        new-token part of `generate()`'s output.
        """
        assistant = kwargs.pop("assistant_model", None)
        generation_config = kwargs.pop("generation_config", None)
        _refuse_constrained_speculation(generation_config, assistant, kwargs)
        plan = self._plan_generation(
            inputs, generation_config, kwargs.pop("logits_processor", None),
            kwargs.pop("stopping_criteria", None), kwargs.pop("tokenizer", None), kwargs.pop("generator", None),
            kwargs.pop("seed", None), kwargs,
        )
        steps = self._steps(plan, assistant)
        if plan.config.num_beams > 1:
            raise ValueError("generate_stream() does not do beam search; set `num_beams=1`.")
        for step in steps:
            yield step.tokens

    def _steps(self, plan: GenerationPlan, assistant: Any) -> Iterator[DecodeStep]:
        """The decode loop for this call: speculative (prompt lookup or an assistant) or plain."""
        if not check_speculation(self, plan.config, assistant, plan.input_ids.shape[0]):
            return self._decode_steps(plan)
        return speculative_steps(self, plan, assistant)

    # ------------------------------------------------------------------ model calls
    def _forward_last_logits(self, input_ids, attention_mask, position_ids, cache, cache_position,
                             inputs_embeds=None) -> torch.Tensor:
        """Float32 logits of the last position, (N, V)."""
        output = self(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            cache_position=cache_position,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :].to(dtype=torch.float32)

    def _prefill(self, plan: GenerationPlan, cache: Any) -> torch.Tensor:
        """Run the prompt through the model in pieces of `prefill_chunk_size` (default 2048) tokens, bounding
        activation memory for long prompts; returns the last position's logits."""
        length = plan.prefill_length
        chunk = plan.config.prefill_chunk_size or min(length, _DEFAULT_PREFILL_CHUNK)
        if not isinstance(chunk, int) or chunk <= 0:
            raise ValueError(f"`prefill_chunk_size` must be a positive integer, got {chunk!r}.")
        for start in range(plan.cached_length, length, chunk):  # positions the user's cache holds are not rerun
            end = min(start + chunk, length)
            mask = None if plan.attention_mask is None else plan.attention_mask[:, :end]
            cache_position = torch.arange(start, end, device=plan.input_ids.device)
            ids, embeds = plan.input_ids[:, start:end], None
            if plan.inputs_embeds is not None:
                ids, embeds = None, plan.inputs_embeds[:, start:end]
            logits = self._forward_last_logits(ids, mask, plan.position_ids[:, start:end], cache, cache_position,
                                               embeds)
        return logits

    def _decode_step(self, tokens, position_ids, cache_position, attention_mask, cache) -> torch.Tensor:
        """One new token per row: tokens/position_ids (N, 1), cache_position (1,), attention_mask None or
        (N, max_length) over all cache slots. Shapes never change between steps. Returns (N, V) float32."""
        return self._forward_last_logits(tokens, attention_mask, position_ids, cache, cache_position)

    def _decode_step_fn(self, config: GenerationConfig) -> Any:
        """The callable the loops use for every new token (signature of `_decode_step`): the eager step or
        its `torch.compile`d wrapper (see qwen2.generation.fast; `disable_compile` opts out). Called before
        the prefill: it readies the weights for the path it picks."""
        return decode_step_fn(self, config)

    def _make_cache(self, batch_size: int, max_length: int) -> Any:
        from qwen2.cache import StaticCache

        # No dtype/device: the buffers are allocated at prefill in the dtype of the keys the model computes,
        # which stays right for quantised or mixed-precision weights.
        # The length is rounded up so that a compiled decode step is reused across prompt lengths.
        return StaticCache(self.config, max_batch_size=batch_size, max_cache_len=cache_length(max_length))

    # ------------------------------------------------------------------ the decode loop
    def _decode_steps(self, plan: GenerationPlan) -> Iterator[DecodeStep]:
        """Greedy / multinomial sampling, one step per yield, until every row is finished."""
        config = plan.config
        input_ids = plan.input_ids
        batch_size, prompt_length = input_ids.shape[0], plan.prefill_length
        # Embeddings-only prompts: max_length counts new tokens, the cache holds the prompt's positions too.
        cache = self._make_cache(batch_size, config.max_length + prompt_length - input_ids.shape[1])
        decode_step = self._decode_step_fn(config)
        if plan.user_cache is not None:
            seed_cache(cache, plan.user_cache, plan.cached_length)
        logits = self._prefill(plan, cache)
        # The mask covers every cache slot up front (ones past the prompt): one static shape for all steps.
        attention_mask = plan.attention_mask
        if attention_mask is not None:
            slots = cache.get_max_cache_shape()
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones(batch_size, slots - prompt_length)], dim=-1
            )
        position_ids = plan.position_ids[:, -1:] + 1  # (N, 1)
        cache_position = torch.tensor([prompt_length], device=input_ids.device)
        unfinished = torch.ones(batch_size, dtype=torch.bool, device=input_ids.device)
        while True:
            scores = apply_processors(plan.processors, input_ids, logits)
            if config.do_sample:
                probs = torch.softmax(scores, dim=-1)
                tokens = torch.multinomial(probs, num_samples=1, generator=plan.generator).squeeze(1)
            else:
                tokens = torch.argmax(scores, dim=-1)
            if plan.eos_token_id is not None:  # as the reference: only pad when an eos can finish a row
                tokens = torch.where(unfinished, tokens, plan.pad_token_id)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            unfinished = unfinished & ~any_done(plan.criteria, input_ids, scores)
            yield DecodeStep(tokens=tokens, scores=scores, logits=logits, cache=cache)
            if not bool(unfinished.any()):
                if plan.user_cache is not None:
                    extend_user_cache(plan.user_cache, cache, plan.cached_length)
                return
            logits = decode_step(tokens[:, None], position_ids, cache_position, attention_mask, cache)
            position_ids = position_ids + 1
            cache_position = cache_position + 1

    # ------------------------------------------------------------------ preparation
    def _resolve_generation_config(
        self, generation_config: GenerationConfig | None, kwargs: dict[str, Any]
    ) -> tuple[GenerationConfig, dict[str, Any], bool]:
        """Merge call kwargs > the given config > the model's config > library defaults."""
        model_defaults = getattr(self, "generation_config", None)
        if model_defaults is None:
            model_defaults = GenerationConfig.from_model_config(self.config)
        has_default_max_length = (
            kwargs.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and model_defaults.max_length is None
        )
        config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
        for key, value in model_defaults.to_dict().items():
            if getattr(config, key, None) is None:
                setattr(config, key, copy.deepcopy(value))
        for key, value in DEFAULT_GENERATION_PARAMS.items():
            if getattr(config, key, None) is None:
                setattr(config, key, value)
        model_kwargs = config.update(**kwargs)
        return config, model_kwargs, has_default_max_length

    def _plan_generation(
        self,
        inputs: torch.Tensor | None,
        generation_config: GenerationConfig | None,
        logits_processor: Sequence[LogitsProcessor] | None,
        stopping_criteria: Sequence[StoppingCriterion] | None,
        tokenizer: Any,
        generator: torch.Generator | None,
        seed: int | None,
        kwargs: dict[str, Any],
    ) -> GenerationPlan:
        config, model_kwargs, has_default_max_length = self._resolve_generation_config(generation_config, kwargs)
        check_supported(config)
        _refuse_prompt_learning(self)
        for flag in ("output_hidden_states", "output_attentions"):
            if getattr(config, flag) and config.return_dict_in_generate and config.num_beams > 1:
                raise ValueError(f"`{flag}=True` is not supported with beam search by qwen2's generate(); run the "
                                 "model's forward on the output sequences to get them.")
        inputs_embeds = model_kwargs.pop("inputs_embeds", None)
        user_cache = _pick_user_cache(model_kwargs)
        if inputs_embeds is None:
            input_ids = _take_input_ids(inputs, model_kwargs)
        else:
            given = None if inputs is None and "input_ids" not in model_kwargs else _take_input_ids(inputs, model_kwargs)
            inputs_embeds = take_prompt_embeds(self, given, inputs_embeds)
            input_ids = given if given is not None else inputs_embeds.new_zeros(inputs_embeds.shape[0], 0,
                                                                                dtype=torch.long)
        attention_mask = model_kwargs.pop("attention_mask", None)
        check_attention_mask(attention_mask)
        model_kwargs.pop("use_cache", None)  # the cache is always used; the tokens are the same either way
        model_kwargs.pop("token_type_ids", None)  # some tokenizers return it; Qwen2 has no token types
        prefix_allowed_tokens_fn = model_kwargs.pop("prefix_allowed_tokens_fn", None)
        constraint = {name: model_kwargs.pop(name) for name in _CONSTRAINT_ARGUMENTS if name in model_kwargs}
        for name in model_kwargs:
            if name in _UNSUPPORTED_ARGUMENTS:
                raise ValueError(f"`{name}` is not supported by qwen2's generate(); remove it.")
        if model_kwargs:
            raise ValueError(
                f"generate() got arguments that are neither generation options nor model inputs: "
                f"{sorted(model_kwargs)}. Check their spelling against GenerationConfig's fields."
            )
        device = input_ids.device
        batch_size = input_ids.shape[0]
        eos, pad = self._special_tokens(config, device, attention_mask is not None, batch_size)
        if inputs_embeds is not None and input_ids.shape[1] == 0:  # the mask covers the embeddings' positions
            attention_mask = _prepare_attention_mask(input_ids.new_ones(inputs_embeds.shape[:2]), attention_mask,
                                                     None, None)
        else:
            attention_mask = _prepare_attention_mask(input_ids, attention_mask, pad, eos)
        if batch_size > 1 and bool((attention_mask[:, -1] == 0).any()):
            logger.warning(
                "Right padding was detected in a batch for a decoder-only model: the padded rows will continue "
                "after their pad tokens. Pad on the left (tokenizer padding_side='left')."
            )
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        padding_lengths = None
        if bool((attention_mask == 1).all()):
            attention_mask = None
        else:
            padding_lengths = (attention_mask != 0).int().argmax(dim=1)

        expand = max(config.num_beams, config.num_return_sequences)
        if expand > 1 and inputs_embeds is not None:
            raise ValueError("`inputs_embeds` cannot be combined with beam search or num_return_sequences > 1.")
        cached = 0 if user_cache is None else cached_length(self, user_cache, batch_size, position_ids.shape[1],
                                                              expand)
        if expand > 1:
            input_ids = input_ids.repeat_interleave(expand, dim=0)
            position_ids = position_ids.repeat_interleave(expand, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(expand, dim=0)
                padding_lengths = padding_lengths.repeat_interleave(expand, dim=0)

        prompt_length = input_ids.shape[1]
        if prompt_length == 0 and config.max_new_tokens is None and not has_default_max_length:
            config.max_length -= inputs_embeds.shape[1]  # as the reference: max_length then counts new tokens
        self._resolve_lengths(config, prompt_length, has_default_max_length)
        if seed is not None and generator is None:
            generator = torch.Generator(device=device).manual_seed(seed)

        custom = list(logits_processor or ())
        if any(value is not None for value in constraint.values()):
            custom.append(_constraint_processor(tokenizer, eos, constraint))
        processors = build_logits_processors(config, prompt_length, eos, padding_lengths, custom,
                                             prefix_allowed_tokens_fn)
        criteria: list[StoppingCriterion] = [MaxLength(config.max_length)]
        if config.max_time is not None:
            criteria.append(MaxTime(config.max_time))
        if config.stop_strings is not None:
            criteria.append(StopStrings(config.stop_strings, tokenizer))
        if eos is not None:
            criteria.append(EosToken(eos))
        criteria.extend(stopping_criteria or ())
        return GenerationPlan(config, input_ids, attention_mask, position_ids, processors, criteria, eos, pad,
                              generator, inputs_embeds, user_cache, cached)

    def _special_tokens(
        self, config: GenerationConfig, device: torch.device, has_mask: bool, batch_size: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        eos = None
        if config.eos_token_id is not None:
            eos = torch.tensor(config.eos_token_id, dtype=torch.long, device=device).reshape(-1)
            if bool((eos < 0).any()):
                raise ValueError(f"`eos_token_id` must be non-negative token ids, got {config.eos_token_id!r}.")
        pad = None
        if config.pad_token_id is not None:
            pad = torch.tensor(config.pad_token_id, dtype=torch.long, device=device)
        elif eos is not None:
            if not has_mask and batch_size > 1:
                logger.warning(
                    "The attention mask and the pad token id were not set, with a batched input: pass the "
                    "tokenizer's `attention_mask` to get reliable results."
                )
            logger.info("Setting `pad_token_id` to `eos_token_id`:%d for open-end generation.", int(eos[0]))
            pad = eos[0]
        return eos, pad

    def _resolve_lengths(self, config: GenerationConfig, prompt_length: int, has_default_max_length: bool) -> None:
        context = getattr(self.config, "max_position_embeddings", None)
        if context is not None and prompt_length > context:
            raise ValueError(
                f"The prompt is {prompt_length} tokens long, longer than the model's context of {context} tokens "
                "(config.max_position_embeddings). Shorten the prompt."
            )
        if config.max_new_tokens is not None:
            if not has_default_max_length:
                logger.warning(
                    "Both `max_new_tokens` (=%d) and `max_length` (=%d) are set; `max_new_tokens` takes precedence.",
                    config.max_new_tokens, config.max_length,
                )
            config.max_length = config.max_new_tokens + prompt_length
        elif has_default_max_length:
            logger.warning(
                "Using the default `max_length` (%d new tokens) to bound generation; set `max_new_tokens`.",
                config.max_length,
            )
            config.max_length = config.max_length + prompt_length
            if context is not None:
                config.max_length = min(config.max_length, context)
        if config.min_new_tokens is not None:
            config.min_length = config.min_new_tokens + prompt_length
        if prompt_length >= config.max_length:
            raise ValueError(
                f"Input length of input_ids is {prompt_length}, but `max_length` is set to {config.max_length}. "
                "Increase `max_length` or, better, set `max_new_tokens`."
            )
        if context is not None and config.max_length > context:
            logger.warning(
                "max_length=%d exceeds the model's context of %d tokens; generation stops at the context length.",
                config.max_length, context,
            )
            config.max_length = context


def _constraint_processor(tokenizer: Any, eos: torch.Tensor | None, constraint: dict[str, Any]) -> LogitsProcessor:
    """The structured-output processor for generate()'s json_schema=/regex=/grammar= (qwen2[structured])."""
    if tokenizer is None:
        raise ValueError(f"{' / '.join(f'`{name}`' for name in constraint)} needs the tokenizer: pass `tokenizer=` "
                         "to generate().")
    from qwen2.constrained import ConstrainedLogitsProcessor

    eos_ids = eos.tolist() if eos is not None else None
    return ConstrainedLogitsProcessor(tokenizer, eos_token_id=eos_ids, **constraint)


def _refuse_constrained_speculation(config: GenerationConfig | None, assistant: Any, kwargs: dict[str, Any]) -> None:
    """The structured-output processor follows the answer one token at a time; speculation's verification asks
    it about several prefixes at once."""
    lookup = kwargs.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None))
    if (assistant is not None or lookup is not None) and any(
            kwargs.get(name) is not None for name in _CONSTRAINT_ARGUMENTS):
        raise ValueError("Structured output (json_schema / regex / grammar) cannot be combined with speculative "
                         "decoding (`prompt_lookup_num_tokens` / `assistant_model`) in generate(); drop one.")


def _refuse_prompt_learning(model: Any) -> None:
    """peft's prompt-learning adapters (prompt/prefix tuning) inject their virtual tokens through
    `prepare_inputs_for_generation`, which this generation loop does not call: refuse instead of ignoring them."""
    override = model.__dict__.get("prepare_inputs_for_generation")  # peft sets it on the model while generating
    peft_config = getattr(getattr(override, "__self__", None), "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(f"peft {peft_config.peft_type} adapters are not supported by qwen2's generate(): their "
                         "virtual tokens would be dropped. LoRA-style adapters work.")


def _pick_user_cache(model_kwargs: dict[str, Any]) -> Any:
    cache, alias = model_kwargs.pop("past_key_values", None), model_kwargs.pop("cache", None)
    if cache is not None and alias is not None:
        raise ValueError("Pass either `past_key_values` or `cache`, not both.")
    return cache if alias is None else alias


def _take_input_ids(inputs: torch.Tensor | None, model_kwargs: dict[str, Any]) -> torch.Tensor:
    passed = model_kwargs.pop("input_ids", None)
    if inputs is not None and passed is not None:
        raise ValueError("Pass the prompt either as `inputs` or as `input_ids`, not both.")
    input_ids = inputs if inputs is not None else passed
    if input_ids is None:
        raise ValueError("generate() needs the prompt token ids (`input_ids`, shape (batch, length)).")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must be an integer tensor of shape (batch, length), got {shape}.")
    if input_ids.shape[1] == 0:
        raise ValueError("`input_ids` is empty: generate() needs at least one prompt token.")
    return input_ids.long()


def _prepare_attention_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad: torch.Tensor | None, eos: torch.Tensor | None
) -> torch.Tensor:
    """The given 2D mask, or one inferred from pad tokens when pad is not also an eos token (as the reference)."""
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}."
            )
        return attention_mask.to(input_ids.device).long()
    ones = torch.ones_like(input_ids)
    if pad is None:
        return ones
    pad_is_eos = eos is not None and bool(torch.isin(eos, pad).any())
    if bool((input_ids == pad).any()) and not pad_is_eos:
        return input_ids.ne(pad).long()
    return ones
