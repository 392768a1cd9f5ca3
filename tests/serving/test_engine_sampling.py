"""Per-request sampling through the engine: seeded requests reproduce whatever runs beside them (even when
preempted), logprobs and prompt logprobs equal transformers' on the same weights, stop strings and stop ids."""

from __future__ import annotations

import pytest
import torch
import transformers

from qwen2 import SamplingParams

from engine_harness import TINY, make_engine, run_to_end, tiny  # noqa: F401 (a fixture)


def _tokens(engine, requests):
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    return {rid: [c.token_ids for c in out.outputs] for rid, out in run_to_end(engine).items()}


def test_seeded_request_is_reproducible_whatever_runs_beside_it(tiny):
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=1234, max_tokens=30, ignore_eos=True, n=2)
    prompt = list(range(3, 60))
    alone = _tokens(make_engine(tiny), [("x", prompt, seeded)])["x"]
    g = torch.Generator().manual_seed(5)
    crowd = [(f"o{i}", torch.randint(3, 96, (int(n),), generator=g).tolist(),
              SamplingParams(temperature=1.2, max_tokens=25, ignore_eos=True, seed=i if i % 2 else None))
             for i, n in enumerate(torch.randint(5, 300, (8,), generator=g))]
    # A small pool: the crowd preempts and the seeded request is recomputed part-way.
    engine = make_engine(tiny, blocks=40, max_num_batched_tokens=32, max_num_seqs=6)
    beside = _tokens(engine, crowd[:4] + [("x", prompt, seeded)] + crowd[4:])["x"]
    assert beside == alone
    assert alone[0] != alone[1]  # the two samples draw from their own generators
    assert engine.stats().num_preemptions > 0


@pytest.fixture(scope="module")
def hf_tiny(tiny):
    theirs = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).eval()
    theirs.load_state_dict(tiny.state_dict())
    return theirs


def test_logprobs_and_prompt_logprobs_match_transformers(tiny, hf_tiny):
    prompt = list(range(10, 50))
    engine = make_engine(tiny, max_num_batched_tokens=16)  # the prompt's logprobs come in three chunks
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=6, logprobs=2, prompt_logprobs=1,
                                                   ignore_eos=True))
    out = run_to_end(engine)["r"]
    generated = out.outputs[0].token_ids
    with torch.no_grad():
        logits = hf_tiny(torch.tensor([prompt + generated])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        entry = out.prompt_logprobs[position]
        token = prompt[position]
        assert entry[token].logprob == pytest.approx(float(reference[position - 1, token]), abs=1e-4)
        best = int(reference[position - 1].argmax())
        assert entry[best].rank == 1
    for step, token in enumerate(generated):
        row = reference[len(prompt) - 1 + step]
        entry = out.outputs[0].logprobs[step]
        assert token == int(row.argmax()) and entry[token].rank == 1
        assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert set(entry) == set(row.topk(2).indices.tolist())
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(generated)))


class CharTokenizer:
    """Token i is the letter chr(97 + i % 26): enough to check stop strings' cut and hold-back rules."""

    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_cut_the_text_and_streamed_text_only_grows(tiny):
    engine = make_engine(tiny, CharTokenizer())
    free = _tokens(engine, [("free", [5, 6, 7], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))])
    text = CharTokenizer().decode(free["free"][0])
    stop = text[7:10]  # three letters the greedy answer produces at tokens 7-9
    first = text.find(stop)
    engine.add_request("s", [5, 6, 7], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                      stop=[stop, "#never#"]))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append(out.outputs[0].text)
            final = out
    completion = final.outputs[0]
    assert completion.text == text[:first] and completion.finish_reason == "stop"
    assert completion.stop_reason == stop
    assert completion.token_ids == free["free"][0][:first + len(stop)]
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))
    assert all(stop not in t for t in seen)


def test_stop_token_ids_and_eos(tiny):
    engine = make_engine(tiny)
    free = _tokens(engine, [("f", [5, 6, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))])["f"][0]
    stop_id = free[4]
    engine.add_request("s", [5, 6, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                      stop_token_ids=[stop_id]))
    engine.add_request("e", [5, 6, 7], SamplingParams(temperature=0, max_tokens=12, logit_bias={2: 100.0},
                                                      min_tokens=3))
    done = run_to_end(engine)
    s = done["s"].outputs[0]
    assert s.token_ids == free[:free.index(stop_id) + 1] and s.stop_reason == stop_id
    e = done["e"].outputs[0]
    assert e.token_ids[-1] == 2 and len(e.token_ids) == 4 and e.finish_reason == "stop"  # eos banned for 3
