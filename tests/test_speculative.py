"""Speculative decoding in generate() (prompt lookup and an assistant model) on tiny random models.

Oracles: transformers' own `prompt_lookup_num_tokens` / plain greedy on the same weights; for sampling, the exact
token distribution computed from the model's probabilities by enumeration; the plain run's cache for rollback.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import qwen2
from qwen2.generation import GenerationConfig
from qwen2.generation.speculative import _verify, last_speculation_stats

from test_generation import TINY, tiny_pair  # noqa: F401 (a fixture: ours and transformers' on the same weights)


@pytest.fixture(scope="module")
def assistant():
    torch.manual_seed(99)
    return qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**{**TINY, "num_hidden_layers": 1})).eval()


def _repetitive_prompts(count: int) -> list[torch.Tensor]:
    """Prompts that repeat a random span (what prompt lookup finds), as a code edit repeats its function."""
    generator = torch.Generator().manual_seed(3)
    prompts = []
    for i in range(count):
        span = torch.randint(3, TINY["vocab_size"], (1, 8 + i), generator=generator)
        prompts.append(torch.cat([span, span, span[:, :4]], dim=1))
    return prompts


@pytest.mark.parametrize("ngram", [None, 1, 3])
def test_prompt_lookup_greedy_equals_transformers_prompt_lookup_and_plain_greedy(tiny_pair, ngram):
    ours, theirs = tiny_pair
    drafted = 0
    for ids in _repetitive_prompts(4):
        options = dict(max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=5, max_matching_ngram_size=ngram)
        speculative = ours.generate(ids, **options)
        drafted += last_speculation_stats().accepted
        assert torch.equal(speculative, theirs.generate(ids, **options))
        assert torch.equal(speculative, ours.generate(ids, max_new_tokens=30, do_sample=False))
    assert drafted > 0  # the drafts were really verified, not skipped


@pytest.mark.parametrize("schedule", ["constant", "heuristic"])
def test_assistant_greedy_equals_plain_greedy(tiny_pair, assistant, schedule):
    ours = tiny_pair[0]
    for ids in _repetitive_prompts(3):
        plain = ours.generate(ids, max_new_tokens=25, do_sample=False)
        for helper in (assistant, ours):  # a poor assistant (mostly rejected) and a perfect one (all accepted)
            out = ours.generate(ids, max_new_tokens=25, do_sample=False, assistant_model=helper, num_assistant_tokens=4,
                                num_assistant_tokens_schedule=schedule, assistant_confidence_threshold=0.0)
            assert torch.equal(out, plain)
            stats = last_speculation_stats()
            if helper is ours:
                assert stats.accepted == stats.drafted > 0


def test_stops_at_eos_inside_an_accepted_draft_as_plain(tiny_pair):
    ours = tiny_pair[0]
    for ids in _repetitive_prompts(4):
        plain = ours.generate(ids, max_new_tokens=20, do_sample=False)
        answer = plain[0, ids.shape[1]:]
        eos = int(answer[len(answer) // 2])  # a token plain greedy produces mid-answer becomes the eos
        expected = ours.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0)
        got = ours.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0,
                            assistant_model=ours, num_assistant_tokens=8, assistant_confidence_threshold=0.0)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("drafter", ["lookup", "assistant"])
def test_cache_after_speculation_equals_a_plain_runs(tiny_pair, drafter):
    """The rejected positions are rolled back: same length, same keys and values as plain decoding leaves."""
    ours = tiny_pair[0]
    ids = _repetitive_prompts(2)[1]
    options = dict(max_new_tokens=24, do_sample=False, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    plain = ours.generate(ids, **options)
    extra = dict(prompt_lookup_num_tokens=6) if drafter == "lookup" else dict(
        assistant_model=tiny_pair[0], num_assistant_tokens=5, assistant_confidence_threshold=0.0)
    speculative = ours.generate(ids, **options, **extra)
    assert last_speculation_stats().accepted > 0
    assert torch.equal(speculative.sequences, plain.sequences)
    assert speculative.cache.get_seq_length() == plain.cache.get_seq_length() == plain.sequences.shape[1] - 1
    length = plain.cache.get_seq_length()
    for mine, reference in zip(speculative.cache.layers, plain.cache.layers):
        torch.testing.assert_close(mine.keys[:, :, :length], reference.keys[:, :, :length])
        torch.testing.assert_close(mine.values[:, :, :length], reference.values[:, :, :length])


def test_streaming_yields_the_speculative_tokens_one_by_one(tiny_pair):
    ours = tiny_pair[0]
    ids = _repetitive_prompts(1)[0]
    streamed = list(ours.generate_stream(ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4))
    assert all(t.shape == (1,) for t in streamed)
    assert torch.equal(torch.cat(streamed), ours.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:])


# -------------------------------------------------------------------------------- the sampling distribution
SMALL = dict(TINY, vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1)


def _tv(counts: torch.Tensor, exact: torch.Tensor) -> float:
    return float(0.5 * (counts / counts.sum() - exact).abs().sum())


@pytest.mark.parametrize("one_hot", [True, False], ids=["lookup", "assistant"])
def test_the_acceptance_rule_draws_from_the_models_distribution(one_hot):
    """One verified position, many draws: whatever the draft distribution q (one-hot for prompt lookup), the
    token the rule yields is distributed as the model's p (Chen et al.), while q itself is far from p."""
    generator = torch.Generator().manual_seed(0)
    vocab, draws = 8, 20000
    p = torch.distributions.Dirichlet(torch.ones(vocab)).sample()
    q = torch.distributions.Dirichlet(torch.ones(vocab)).sample()
    config = GenerationConfig(do_sample=True)
    counts = torch.zeros(vocab)
    for _ in range(draws):
        if one_hot:
            proposed, q_row = torch.tensor(3), None
        else:
            proposed, q_row = torch.multinomial(q, 1, generator=generator)[0], q
        token, _ = _verify(config, p.log(), proposed, q_row, generator)
        counts[token] += 1
    assert _tv(counts, p) < 0.02
    assert 0.5 * float((q - p).abs().sum()) > 0.1 and float(p[3]) < 0.9  # the test can see a wrong rule


def _exact_third_token_distribution(model, ids: torch.Tensor) -> torch.Tensor:
    """P(x3 | prompt) = sum over x1, x2 of p(x1) p(x2 | x1) p(x3 | x1 x2), by enumerating the vocabulary."""
    vocab = SMALL["vocab_size"]
    with torch.no_grad():
        p1 = model(ids).logits[0, -1].softmax(-1)  # (V,)
        pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))  # (V*V, 2)
        rows = torch.cat([ids.expand(vocab * vocab, -1), pairs], dim=1)
        probs = model(rows).logits.softmax(-1)  # (V*V, L+2, V)
    joint = p1[pairs[:, 0]] * probs[torch.arange(vocab * vocab), -2, pairs[:, 1]]  # p(x1, x2)
    return (joint[:, None] * probs[:, -1]).sum(0)


def test_speculative_sampling_keeps_the_models_distribution_end_to_end():
    """generate() with an assistant whose own distribution is far from the model's: the 3rd new token (drawn
    after verified drafts) follows the model's exact distribution within a total-variation bound. Fixed seeds."""
    torch.manual_seed(5)
    model = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**SMALL)).eval()
    helper = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**SMALL)).eval()
    with torch.no_grad():  # peaked distributions, so that the helper's differ clearly from the model's
        model.lm_head.weight.mul_(40)
        helper.lm_head.weight.mul_(40)
    ids = torch.tensor([[3, 5, 3, 5, 3]])
    exact = _exact_third_token_distribution(model, ids)
    samples, drafted = 300, 0
    counts = torch.zeros(SMALL["vocab_size"])
    generator = torch.Generator().manual_seed(0)
    for _ in range(samples):
        out = model.generate(ids, max_new_tokens=3, do_sample=True, top_k=0, generator=generator, eos_token_id=None,
                             pad_token_id=0, assistant_model=helper, num_assistant_tokens=2,
                             assistant_confidence_threshold=0.0)
        counts[out[0, -1]] += 1
        drafted += last_speculation_stats().drafted
    assert drafted >= samples  # every call verified a draft
    assert _tv(counts, exact) < 0.1, (counts / samples, exact)
    assert _tv(_exact_third_token_distribution(helper, ids), exact) > 0.2


# -------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("options, message", [
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens"),
    (dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=0), "max_matching_ngram_size"),
    (dict(prompt_lookup_num_tokens=3, num_beams=2), "beam search"),
    (dict(prompt_lookup_num_tokens=3, regex="a+"), "Structured output"),
    (dict(assistant_model="small"), "assistant_model"),
])
def test_bad_speculative_arguments_are_refused(tiny_pair, options, message):
    with pytest.raises(ValueError, match=message):
        tiny_pair[0].generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, **options)


def test_an_assistant_with_another_vocabulary_is_refused(tiny_pair):
    other = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**{**TINY, "vocab_size": 100})).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_pair[0].generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, assistant_model=other)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens.*assistant_model|either"):
        tiny_pair[0].generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, assistant_model=tiny_pair[0],
                         prompt_lookup_num_tokens=2)


def test_a_batch_decodes_plainly(tiny_pair):
    ours = tiny_pair[0]
    ids = torch.cat(_repetitive_prompts(1) * 2)
    assert torch.equal(ours.generate(ids, max_new_tokens=10, prompt_lookup_num_tokens=3),
                       ours.generate(ids, max_new_tokens=10))


@pytest.mark.parametrize("scheme", [None, "int8"], ids=["bf16", "int8"])
def test_eager_verification_rows_equal_the_eager_steps_bit_for_bit(scheme):
    """Eager, each verification row is computed as the plain one-row step computes it: the row kernels' linears
    do not depend on the row count, and attention runs row by row over the static cache's every slot. Oracle:
    plain eager greedy's raw logits, bit for bit, on prompts whose drafts are accepted and rejected (before
    attention was split, 11 of 30 such bf16 answers parted from plain greedy at a near-tie)."""
    from conftest import cpu_flags, require_int8_kernels
    from qwen2.quantization import quantize_model

    require_int8_kernels()
    if "avx512_bf16" not in cpu_flags():
        pytest.skip("no AVX512-BF16 on this CPU: bf16 rows go through oneDNN, whose blocking follows the row count")
    torch.manual_seed(5)
    model = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**{**TINY, "vocab_size": 256})).to(torch.bfloat16).eval()
    if scheme:
        quantize_model(model, scheme)
    options = dict(max_new_tokens=24, do_sample=False, disable_compile=True, return_dict_in_generate=True,
                   output_logits=True, eos_token_id=None, pad_token_id=0)
    drafts = accepted = 0
    for ids in _repetitive_prompts(3):
        plain = model.generate(ids, **options)
        speculative = model.generate(ids, prompt_lookup_num_tokens=10, **options)
        drafts, accepted = drafts + last_speculation_stats().verify_steps, accepted + last_speculation_stats().accepted
        assert torch.equal(speculative.sequences, plain.sequences)
        for step, (got, expected) in enumerate(zip(speculative.logits, plain.logits, strict=True)):
            assert torch.equal(got, expected), f"token {step}: the verification's logits differ from the step's"
    assert drafts > 0 and accepted > 0


def test_compiled_verification_rows_equal_the_compiled_steps_bit_for_bit():
    """The compiled verification (rows padded to VERIFY_ROWS) computes each row as the compiled one-row step
    does: int8 linears on the VNNI kernel, the tied bf16 head as `rows_matvec`, attention row by row. Oracle: plain
    compiled greedy's raw logits, bit for bit, and its tokens. The answers run to the end of the static cache
    (max_length 256), where the padded rows no longer fit and the last tokens decode plainly."""
    from conftest import require_int8_kernels
    from qwen2.generation import speculative_verify
    from qwen2.quantization import quantize_model

    require_int8_kernels()
    torch.manual_seed(5)
    config = qwen2.Qwen2Config(**{**TINY, "vocab_size": 256, "num_hidden_layers": 1, "max_position_embeddings": 512,
                                  "tie_word_embeddings": True})
    model = qwen2.Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    quantize_model(model, "int8")
    options = dict(max_length=256, do_sample=False, disable_compile=False, return_dict_in_generate=True,
                   output_logits=True, eos_token_id=None, pad_token_id=0)
    ids = _repetitive_prompts(2)[1]
    plain = model.generate(ids, **options)
    speculative = model.generate(ids, prompt_lookup_num_tokens=7, **options)
    stats = last_speculation_stats()
    assert stats.accepted > 0 and stats.verify_steps > 0 and stats.plain_steps > 0
    assert torch.equal(speculative.sequences, plain.sequences)
    for step, (got, expected) in enumerate(zip(speculative.logits, plain.logits, strict=True)):
        assert torch.equal(got, expected), f"token {step}: the verification's logits differ from the step's"
    step = speculative_verify._compiled[model]
    assert step.compiled_once and not step.failed
