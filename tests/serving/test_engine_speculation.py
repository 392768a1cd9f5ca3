"""N-gram speculation in the serving engine: greedy outputs equal the plain engine's (and generate()'s), under
continuous batching, preemption and prefix caching; rejected drafts' blocks go back to the pool; seeded
sampling draws the same tokens as without speculation."""

from __future__ import annotations

import asyncio

import pytest
import torch

from qwen2 import SamplingParams

from engine_harness import make_engine, run_to_end, tiny  # noqa: F401 (a fixture)
from server_harness import tiny_dir  # noqa: F401 (a fixture)


def _prompts(count: int) -> list[list[int]]:
    """Prompts repeating a random span (what n-gram lookup finds), of varied lengths."""
    generator = torch.Generator().manual_seed(11)
    prompts = []
    for i in range(count):
        span = torch.randint(3, 96, (6 + 3 * i,), generator=generator).tolist()
        prompts.append(span + span + span[:3])
    return prompts


def _run(model, prompts, speculative: int, blocks: int = 1024, **params) -> tuple[dict, object]:
    engine = make_engine(model, blocks=blocks, block_size=4, speculative_ngram_tokens=speculative)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(**{"temperature": 0, "max_tokens": 24, **params}))
    finished = run_to_end(engine)
    return {key: out.outputs[0].token_ids for key, out in finished.items()}, engine


@pytest.mark.parametrize("blocks", [1024, 14], ids=["roomy", "preempting"])
def test_speculative_engine_greedy_equals_the_plain_engine(tiny, blocks):
    prompts = _prompts(6)
    plain, _ = _run(tiny, prompts, 0, blocks=blocks, ignore_eos=True)
    speculative, engine = _run(tiny, prompts, 5, blocks=blocks, ignore_eos=True)
    assert speculative == plain
    assert engine.speculation.accepted > 0  # drafts were verified and kept, not only tried
    assert engine.pool.num_free == engine.pool.num_blocks  # every block, rejected drafts' included, came back
    if blocks == 14:
        assert engine.scheduler.num_preemptions > 0


def test_speculative_engine_greedy_equals_generate(tiny):
    prompts = _prompts(3)
    speculative, _ = _run(tiny, prompts, 4, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        reference = tiny.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        assert speculative[str(i)] == reference[0, len(prompt):].tolist()


def test_rejected_draft_blocks_are_freed_during_decoding(tiny):
    """Mid-run, a speculating sequence holds only the blocks its computed tokens need, as a plain one."""
    engine = make_engine(tiny, blocks=256, block_size=4, speculative_ngram_tokens=8)
    for i, prompt in enumerate(_prompts(3)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    while engine.scheduler.running or engine.scheduler.waiting:
        engine.step()
        held = sum(len(seq.block_table) for seq in engine.scheduler.running)
        assert engine.pool.num_free == engine.pool.num_blocks - held
        for seq in engine.scheduler.running:
            assert len(seq.block_table) == -(-seq.num_computed_tokens // 4)
    assert engine.speculation.drafted > engine.speculation.accepted > 0  # accepted and rejected drafts both seen


def test_seeded_sampling_draws_the_same_tokens_with_speculation(tiny):
    """Each position is sampled from the model's distribution with the sequence's generator, as a plain step
    would: the same seed gives the same tokens (a one-hot draft leaves the distribution unchanged)."""
    prompts = _prompts(3)
    plain, _ = _run(tiny, prompts, 0, temperature=0.8, seed=3, ignore_eos=True)
    speculative, _ = _run(tiny, prompts, 5, temperature=0.8, seed=3, ignore_eos=True)
    assert speculative == plain


def test_negative_speculative_tokens_refused(tiny):
    with pytest.raises(ValueError, match="speculative_ngram_tokens"):
        make_engine(tiny, speculative_ngram_tokens=-1)


def test_qwen2_serve_speculative_ngram_option_reaches_the_engine(tiny_dir):
    from qwen2.cli.main import build_parser
    from qwen2.serving.cli import _engine_factory

    args = build_parser().parse_args(["serve", "--model", str(tiny_dir), "--speculative-ngram", "6"])
    engine = _engine_factory(args)()
    try:
        assert engine.engine.config.speculative_ngram_tokens == 6
        assert engine.engine.speculation.num_tokens == 6
    finally:
        asyncio.run(engine.shutdown(0))
