"""The engine against generate(): every request's greedy tokens equal generate() on that prompt alone, token for
token, with staggered arrivals, mixed lengths, prefix caching on and off, several prefill chunk sizes, under
preemption (a KV budget too small for everyone) and with aborts (the pool is full again at the end)."""

from __future__ import annotations

import pytest
import torch

from qwen2 import SamplingParams
from qwen2.serving.errors import ContextLengthExceededError, QueueFullError

from engine_harness import make_engine, run_to_end, tiny_model, tiny  # noqa: F401 (a fixture)

EOS = 2


def _workload(seed: int = 0, count: int = 16):
    """16 prompts of 10 to 2,000 tokens (half of them sharing a 300-token prefix, two repeated exactly), with
    8 to 40 new tokens each."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 96, (300,), generator=g).tolist()
    lengths = [10, 2000, 37, 15, 400, 16, 17, 800, 33, 1200, 64, 10, 250, 500, 31, 90][:count]
    prompts = []
    for i, n in enumerate(lengths):
        tokens = torch.randint(3, 96, (n,), generator=g).tolist()
        prompts.append(shared + tokens if i % 2 else tokens)
    if count > 11:
        prompts[11] = list(prompts[3])  # an exact repeat: served whole from the cache but for its last token
    new_tokens = torch.randint(8, 41, (count,), generator=g).tolist()
    return prompts, new_tokens


def _reference(model, prompt, new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=EOS,
                         pad_token_id=0)[0, len(prompt):].tolist()
    return out[:out.index(EOS) + 1] if EOS in out else out


@pytest.fixture(scope="module")
def references(tiny):
    prompts, new_tokens = _workload()
    return prompts, new_tokens, [_reference(tiny, p, n) for p, n in zip(prompts, new_tokens)]


def _serve(engine, prompts, new_tokens, stagger=3, aborts=()):
    """Add request i at step i * stagger; abort the ids in `aborts` once they have 4 tokens."""
    finished, step, pending = {}, 0, list(range(len(prompts)))
    while pending or engine.has_unfinished_requests():
        while pending and pending[0] * stagger <= step:
            i = pending.pop(0)
            engine.add_request(str(i), prompts[i], SamplingParams(temperature=0, max_tokens=new_tokens[i]))
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
            elif int(output.request_id) in aborts and len(output.outputs[0].token_ids) >= 4:
                engine.abort_request(output.request_id)
        step += 1
    return finished


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("chunk", [16, 97, 512])
def test_greedy_equals_generate_alone(tiny, references, prefix_caching, chunk):
    prompts, new_tokens, expected = references
    engine = make_engine(tiny, max_num_batched_tokens=chunk, enable_prefix_caching=prefix_caching)
    finished = _serve(engine, prompts, new_tokens)
    for i, want in enumerate(expected):
        assert finished[str(i)].outputs[0].token_ids == want, f"request {i}"
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    if prefix_caching:
        assert finished["11"].num_cached_tokens == (len(prompts[11]) - 1) // 16 * 16
        assert stats.prefix_cache_hits > 0
    else:
        assert stats.prefix_cache_hits == 0 and finished["11"].num_cached_tokens == 0


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_equals_generate_under_preemption(tiny, references, prefix_caching):
    prompts, new_tokens, expected = references
    # 160 blocks hold the longest request (2,300 + 40 tokens) but not everyone at once.
    engine = make_engine(tiny, blocks=160, max_num_batched_tokens=64, enable_prefix_caching=prefix_caching)
    finished = _serve(engine, prompts, new_tokens, stagger=1)
    for i, want in enumerate(expected):
        assert finished[str(i)].outputs[0].token_ids == want, f"request {i}"
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_aborted_requests_free_their_blocks(tiny, references):
    prompts, new_tokens, expected = references
    aborts = {1, 4, 6, 9}
    engine = make_engine(tiny, blocks=200, max_num_batched_tokens=64)
    finished = _serve(engine, prompts, new_tokens, stagger=2, aborts=aborts)
    for i, want in enumerate(expected):
        output = finished[str(i)].outputs[0]
        if i in aborts and output.finish_reason == "abort":
            assert output.token_ids == want[:len(output.token_ids)]
        else:
            assert output.token_ids == want, f"request {i}"
    assert sum(finished[str(i)].outputs[0].finish_reason == "abort" for i in aborts) >= 2
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total and not engine.has_unfinished_requests()


def test_abort_while_waiting_and_unknown_ids(tiny):
    engine = make_engine(tiny, max_num_seqs=1)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [5, 6, 8], SamplingParams(max_tokens=5))
    engine.step()
    engine.abort_request("b")
    engine.abort_request("nobody")
    outputs = engine.step()
    b = next(o for o in outputs if o.request_id == "b")
    assert b.finished and b.outputs[0].finish_reason == "abort" and b.outputs[0].token_ids == []
    engine.abort_request("a")
    run_to_end(engine)
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_queue_limit_and_context_length(tiny):
    engine = make_engine(tiny, blocks=8, max_waiting=2)  # 8 blocks: max_model_len becomes 128
    assert engine.max_model_len == 128
    with pytest.raises(ContextLengthExceededError):
        engine.add_request("long", [5] * 110, SamplingParams(max_tokens=20))
    engine.add_request("a", [5, 6], SamplingParams())
    engine.add_request("b", [5, 6], SamplingParams())
    with pytest.raises(QueueFullError):
        engine.add_request("c", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="already"):
        engine.add_request("a", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("d", [], SamplingParams())
    with pytest.raises(ValueError, match="vocab|integers"):
        engine.add_request("d", [96], SamplingParams())
    engine.step()  # both admitted: the queue has room again
    engine.add_request("c", [5, 6], SamplingParams())


def test_deadline_times_out(tiny):
    import time

    engine = make_engine(tiny)
    engine.add_request("late", [5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True), deadline=time.time() - 1)
    engine.add_request("fine", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    finished = run_to_end(engine)
    assert finished["late"].outputs[0].finish_reason == "timeout"
    assert finished["fine"].outputs[0].finish_reason == "length"
    assert len(finished["fine"].outputs[0].token_ids) == 3


def test_bfloat16_model_greedy_equals_generate():
    model = tiny_model(torch.bfloat16, seed=3)
    prompts, new_tokens = _workload(seed=1, count=6)
    engine = make_engine(model, max_num_batched_tokens=128)
    finished = _serve(engine, prompts, new_tokens, stagger=2)
    for i, prompt in enumerate(prompts):
        assert finished[str(i)].outputs[0].token_ids == _reference(model, prompt, new_tokens[i]), f"request {i}"


def test_engine_leaves_the_model_alone_and_follows_weight_updates():
    """The runner's packed weights live beside the model: no module swapped, no attribute added, parameters
    untouched; an in-place weight update is seen by the next step (the private copy is rebuilt)."""
    model = tiny_model(seed=5)
    modules = {name: (type(m), dict(vars(m))) for name, m in model.named_modules()}
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompt = list(range(3, 40))
    engine = make_engine(model)
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    run_to_end(engine)
    assert {name: (type(m), dict(vars(m))) for name, m in model.named_modules()} == modules
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
        model.model.layers[1].mlp.down_proj.weight.neg_()
    engine.add_request("b", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    got = run_to_end(engine)["b"].outputs[0].token_ids
    assert got == model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
