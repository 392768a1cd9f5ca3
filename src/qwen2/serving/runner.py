"""How a step runs: the scheduled tokens of every sequence laid out as one flat batch, the model's own layers
called on it, keys/values written to and read from the paged cache, and float32 logits for the rows that
sample.

The model is never changed: the runner calls its modules (embeddings, norms, projections, rope, lm_head), so
every format and scheme the model loads with (float, int8, int4, w8a8, GGUF) runs here unchanged, and the
quantised linears take their own batched kernels; bfloat16 linears on the CPU go through
`qwen2.generation.fast.DecodeLinears`, as generate() decodes: steps of up to 16 tokens through the row kernel
(`kernels.bf16_rows`), larger ones through oneDNN's inner product, both on the weight as it is. Linears and
the MLP see all the step's tokens at once;
attention is per sequence group: decode rows together over their gathered blocks, each prefill chunk on its
own (see `attention.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qwen2.generation.fast import DecodeLinears
from qwen2.model import rotate_half
from qwen2.serving.attention import KVCache, decode_attention, prefill_attention
from qwen2.serving.scheduler import ScheduledBatch



@dataclass
class StepLogits:
    """Float32 logits of the rows that sample (one per sequence whose tokens are all computed now) and, for
    sequences that asked for prompt logprobs, of every prompt position computed this step."""

    sample_rows: list[int]  # index into batch.seqs of each row of `logits`
    logits: Tensor  # (len(sample_rows), V)
    prompt_logits: dict[int, tuple[int, Tensor]]  # batch index -> (first position, (n, V) logits)
    draft_logits: dict[int, Tensor]  # batch index of a speculative row -> (1 + draft, V) logits


class ModelRunner:
    def __init__(self, model: nn.Module, cache: KVCache) -> None:
        decoder = getattr(model, "model", model)
        config = model.config
        if any(kind != "full_attention" for kind in config.layer_types):
            raise ValueError("The serving engine does not support sliding-window attention layers yet "
                             f"(layer_types={sorted(set(config.layer_types))}).")
        self.model = model
        self.decoder = decoder
        self.cache = cache
        self.head_dim = config.head_dim
        self.device = decoder.embed_tokens.weight.device

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, prompt_logprob_rows: set[int]) -> StepLogits:
        return self.run(self.prepare(batch, prompt_logprob_rows))

    def prepare(self, batch: ScheduledBatch, prompt_logprob_rows: set[int]) -> StepInputs:
        """The step's flat inputs, on the CPU; small and picklable, so a tensor-parallel engine's rank 0 can
        send them to the other ranks (qwen2.distributed.serving)."""
        block_size = self.cache.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        last_token_rows: list[int] = []
        prompt_rows: dict[int, tuple[int, int, int]] = {}
        draft_rows: dict[int, tuple[int, int]] = {}
        for row, (seq, count) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed_tokens
            if row in prompt_logprob_rows:
                prompt_rows[row] = (start, len(ids), count)
            if seq.draft:
                draft_rows[row] = (len(ids), count)
            ids.extend(seq.token_ids[start:start + count])
            ids.extend(seq.draft)  # a speculative row: its last token, then the draft to verify
            span = range(start, start + count)
            positions.extend(span)
            slots.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in span)
            if start + count == seq.num_tokens and not seq.draft:
                sample_rows.append(row)
                last_token_rows.append(len(ids) - 1)
        return StepInputs(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                          torch.tensor(slots, dtype=torch.long), sample_rows,
                          torch.tensor(last_token_rows, dtype=torch.long), prompt_rows, draft_rows,
                          _attention_groups(batch, block_size))

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> StepLogits:
        with DecodeLinears():
            return self._run(inputs)

    def _run(self, inputs: StepInputs) -> StepLogits:
        device = self.device
        slot_mapping = inputs.slots.to(device)
        groups = [g.to(device) for g in inputs.groups]
        hidden = self.decoder.embed_tokens(inputs.ids.to(device))  # (T, hidden)
        cos, sin = self.decoder.rotary_emb(hidden, inputs.positions.to(device)[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # (T, 1, D): broadcast over heads
        for index, layer in enumerate(self.decoder.layers):
            hidden = hidden + self._attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin,
                                              slot_mapping, index, groups)
            hidden = hidden + self._mlp(layer.mlp, layer.post_attention_layernorm(hidden))
        hidden = self.decoder.norm(hidden)

        rows = inputs.last_token_rows.to(device)
        logits = self._head(hidden.index_select(0, rows)) if len(rows) else hidden.new_zeros(0, 0).float()
        prompt_logits = {row: (first, self._head(hidden[offset:offset + count]))
                         for row, (first, offset, count) in inputs.prompt_rows.items()}
        draft_logits = {row: self._head(hidden[offset:offset + count])
                        for row, (offset, count) in inputs.draft_rows.items()}
        return StepLogits(inputs.sample_rows, logits, prompt_logits, draft_logits)

    def _head(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(hidden).float()

    def _attention(self, attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, slot_mapping: Tensor,
                   layer: int, groups: list) -> Tensor:
        tokens = x.shape[0]
        q = attn.q_proj(x).view(tokens, -1, self.head_dim)
        k = attn.k_proj(x).view(tokens, -1, self.head_dim)
        v = attn.v_proj(x).view(tokens, -1, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = self.cache.write(layer, slot_mapping, k, v)
        out = torch.empty_like(q)
        for group in groups:
            if group.decode:
                out[group.rows] = decode_attention(q[group.rows], keys, values, group.tables, group.lengths,
                                                   attn.scaling)
            else:
                out[group.rows] = prefill_attention(q[group.rows], keys, values, group.tables, group.start,
                                                    attn.scaling)
        return attn.o_proj(out.view(tokens, -1))

    def _mlp(self, mlp: nn.Module, x: Tensor) -> Tensor:
        gate = mlp.gate_proj(x)
        up = mlp.up_proj(x)
        return mlp.down_proj(mlp.act_fn(gate) * up)


@dataclass
class _Group:
    decode: bool
    rows: slice  # token rows of the flat batch
    tables: Tensor  # decode: (B, max_blocks) block ids; prefill: (num_blocks,)
    lengths: Tensor | None = None  # decode: context lengths (B,), int64 on the CPU
    start: int = 0  # prefill: position of the chunk's first token

    def to(self, device: torch.device) -> _Group:
        return _Group(self.decode, self.rows, self.tables.to(device), self.lengths, self.start)


@dataclass
class StepInputs:
    """What a step computes, laid out flat: token ids, positions and cache slots of every scheduled token,
    the rows that sample, the prompt-logprob spans, and the attention groups."""

    ids: Tensor  # (T,)
    positions: Tensor  # (T,)
    slots: Tensor  # (T,)
    sample_rows: list[int]  # index into batch.seqs of each sampled row
    last_token_rows: Tensor  # flat row of each sampled sequence's last token
    prompt_rows: dict[int, tuple[int, int, int]]  # batch index -> (first position, flat offset, count)
    draft_rows: dict[int, tuple[int, int]]  # batch index of a speculative row -> (flat offset, count)
    groups: list[_Group]


def _attention_groups(batch: ScheduledBatch, block_size: int) -> list[_Group]:
    """The decode rows (one token each, laid out first by the scheduler) as one group; each prefill chunk as
    its own."""
    groups: list[_Group] = []
    decode = [i for i, count in enumerate(batch.num_tokens) if count == 1 and batch.seqs[i].num_computed_tokens]
    decode = decode if decode == list(range(len(decode))) else []  # decode rows are first by construction
    if decode:
        seqs = [batch.seqs[i] for i in decode]
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                              dtype=torch.long)
        lengths = torch.tensor([s.num_computed_tokens + 1 for s in seqs], dtype=torch.long)
        groups.append(_Group(True, slice(0, len(decode)), tables, lengths))
    offset = len(decode)
    for seq, count in zip(batch.seqs[len(decode):], batch.num_tokens[len(decode):]):
        end = seq.num_computed_tokens + count
        blocks = -(-end // block_size)
        tables = torch.tensor(seq.block_table[:blocks], dtype=torch.long)
        groups.append(_Group(False, slice(offset, offset + count), tables, start=seq.num_computed_tokens))
        offset += count
    return groups
