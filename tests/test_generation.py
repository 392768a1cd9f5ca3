"""generate() against transformers' generate() on the same weights.

Tiny random models (weights copied into transformers.Qwen2ForCausalLM) cover every decoding mode and
option; the real default model (slow) covers the seed prompt, batching with left padding, seeded
sampling, stop strings, streaming and beam search.
"""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
import transformers

import qwen2
from qwen2.generation import GenerationConfig, TextIteratorStreamer

from conftest import REFERENCE_DIR

TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
)


@pytest.fixture(scope="module")
def tiny_pair():
    """(ours, transformers') with identical random weights, float32, eval mode."""
    torch.manual_seed(1234)
    theirs = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).eval()
    ours = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**TINY)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.fixture(scope="module")
def prompts():
    """Three prompts of lengths 9, 6 and 3, left-padded with 0 and their attention mask."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, TINY["vocab_size"], (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 3), (2, 6)):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def _both(pair, inputs, seed=None, **kwargs):
    """Run our generate and transformers' with the same arguments (and the same global seed if given)."""
    outputs = []
    for model in pair:
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(model.generate(inputs, **kwargs))
    return outputs


@pytest.fixture(scope="module")
def eos(tiny_pair, prompts):
    """Two token ids that greedy decoding emits at different steps in different rows: real eos events."""
    ids, mask = prompts
    greedy = tiny_pair[1].generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    new = greedy[:, ids.shape[1]:]
    return [int(new[0, 3]), int(new[2, 6])]


@pytest.mark.parametrize(
    "options",
    [
        dict(do_sample=False),
        dict(do_sample=False, repetition_penalty=1.3),
        dict(do_sample=False, no_repeat_ngram_size=2),
        dict(do_sample=False, repetition_penalty=0.8, no_repeat_ngram_size=3, min_length=14),
    ],
    ids=["greedy", "repetition_penalty", "no_repeat_ngram", "combined"],
)
def test_greedy_matches_transformers(tiny_pair, prompts, options):
    ids, mask = prompts
    ours, theirs = _both(tiny_pair, ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0, **options)
    assert torch.equal(ours, theirs)


def test_no_repeat_ngram_really_bans(tiny_pair, prompts):
    """The option changes the output (the greedy text repeats bigrams) and leaves no repeated bigram."""
    ids, mask = prompts
    plain = tiny_pair[0].generate(ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0)
    banned = tiny_pair[0].generate(ids, attention_mask=mask, max_new_tokens=30, pad_token_id=0,
                                   no_repeat_ngram_size=2)
    assert not torch.equal(plain, banned)
    for row, pad in zip(banned.tolist(), (0, 3, 6)):
        bigrams = list(zip(row[pad:], row[pad + 1 :]))
        assert len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.7, top_k=20),
        dict(top_p=0.8, top_k=0),
        dict(min_p=0.1, temperature=1.5, repetition_penalty=1.1),
        dict(typical_p=0.9, num_return_sequences=3),
    ],
    ids=["temperature_top_k", "top_p", "min_p", "typical_return_3"],
)
def test_sampling_matches_transformers_with_the_same_seed(tiny_pair, prompts, options):
    ids, mask = prompts
    ours, theirs = _both(tiny_pair, ids, seed=11, attention_mask=mask, max_new_tokens=16, pad_token_id=0,
                         do_sample=True, **options)
    assert torch.equal(ours, theirs)


def test_sampling_with_a_generator_or_seed_is_reproducible(tiny_pair, prompts):
    ids, mask = prompts
    model = tiny_pair[0]
    kwargs = dict(attention_mask=mask, max_new_tokens=16, pad_token_id=0, do_sample=True, top_k=0)
    first = model.generate(ids, seed=3, **kwargs)
    torch.manual_seed(99)  # the global RNG must not matter
    assert torch.equal(model.generate(ids, seed=3, **kwargs), first)
    assert torch.equal(model.generate(ids, generator=torch.Generator().manual_seed(3), **kwargs), first)
    assert not torch.equal(model.generate(ids, seed=4, **kwargs), first)


@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=4),
        dict(num_beams=4, num_return_sequences=2, length_penalty=0.5),
        dict(num_beams=3, early_stopping=True, length_penalty=2.0),
        dict(num_beams=3, early_stopping="never", no_repeat_ngram_size=2),
        dict(num_beams=3, do_sample=True, top_k=10),
    ],
    ids=["beams4", "return2_lp0.5", "early_stop", "never_ngram", "beam_sample"],
)
def test_beam_search_matches_transformers(tiny_pair, prompts, eos, options):
    ids, mask = prompts
    ours, theirs = _both(tiny_pair, ids, seed=5, attention_mask=mask, max_new_tokens=12, pad_token_id=0,
                         eos_token_id=eos, return_dict_in_generate=True, output_scores=True, **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)
    assert torch.equal(ours.beam_indices, theirs.beam_indices)
    assert len(ours.scores) == len(theirs.scores)
    torch.testing.assert_close(ours.scores[-1], theirs.scores[-1], rtol=1e-4, atol=1e-4)


def test_multiple_eos_ids_and_padding_match_transformers(tiny_pair, prompts, eos):
    ids, mask = prompts
    ours, theirs = _both(tiny_pair, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, theirs)
    row = ours[0, ids.shape[1]:].tolist()
    stop = next(i for i, token in enumerate(row) if token in eos)
    assert stop <= 3 and row[stop + 1 :] == [0] * (len(row) - stop - 1)  # row 0 stopped at an eos, then padding


def test_pad_falls_back_to_the_first_eos_id(tiny_pair, prompts, eos):
    ids, mask = prompts
    ours, theirs = _both(tiny_pair, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(ours, theirs)
    row = ours[0, ids.shape[1]:].tolist()
    stop = next(i for i, token in enumerate(row) if token in eos)
    assert row[stop + 1 :] == [eos[0]] * (len(row) - stop - 1)


def test_min_new_tokens_matches_transformers(tiny_pair, prompts, eos):
    ids, mask = prompts
    ours, theirs = _both(tiny_pair, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos,
                         pad_token_id=0, min_new_tokens=8)
    assert torch.equal(ours, theirs)
    assert not torch.isin(ours[:, ids.shape[1] : ids.shape[1] + 8], torch.tensor(eos)).any()


def test_scores_and_logits_match_transformers(tiny_pair, prompts):
    ids, mask = prompts
    ours, theirs = _both(tiny_pair, ids, seed=2, attention_mask=mask, max_new_tokens=6, pad_token_id=0,
                         do_sample=True, temperature=0.5, top_k=5, return_dict_in_generate=True,
                         output_scores=True, output_logits=True)
    assert torch.equal(ours.sequences, theirs.sequences)
    for mine, reference in zip(ours.scores + ours.logits, theirs.scores + theirs.logits, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4)


def test_default_length_and_generation_config_argument_match_transformers(tiny_pair, prompts):
    ids, _ = prompts
    ours, theirs = tiny_pair
    assert torch.equal(ours.generate(ids[:1]), theirs.generate(ids[:1]))  # 20 new tokens by default
    config = dict(max_new_tokens=5, repetition_penalty=1.2, do_sample=False)
    assert torch.equal(
        ours.generate(ids[:1], generation_config=GenerationConfig(**config)),
        theirs.generate(ids[:1], generation_config=transformers.GenerationConfig(**config)),
    )


def test_chunked_prefill_gives_the_same_tokens(tiny_pair, prompts):
    ids, mask = prompts
    ours, theirs = _both(tiny_pair, ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, prefill_chunk_size=4)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, tiny_pair[0].generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0))


def test_max_time_and_context_bound_the_length(tiny_pair):
    ours, theirs = _both(tiny_pair, torch.tensor([[3, 4, 5]]), max_new_tokens=10, max_time=0.0)
    assert ours.shape[1] == theirs.shape[1] == 4  # the time budget is checked after every token
    context = TINY["max_position_embeddings"]
    near_the_end = torch.full((1, context - 4), 5)
    assert tiny_pair[0].generate(near_the_end, max_new_tokens=20).shape[1] == context


def test_prompt_longer_than_the_context_is_refused(tiny_pair):
    context = TINY["max_position_embeddings"]
    with pytest.raises(ValueError, match=f"{context + 1} tokens long, longer than the model's context of {context}"):
        tiny_pair[0].generate(torch.full((1, context + 1), 5), max_new_tokens=2)


def test_checkpoint_generation_config_sets_the_defaults(tiny_pair, prompts, tmp_path):
    """generation_config.json saved with the model is what generate() uses when the call sets nothing."""
    ids, mask = prompts
    source = tiny_pair[0]
    saved = copy.deepcopy(source.generation_config)
    source.generation_config.update(max_new_tokens=5, repetition_penalty=1.5, pad_token_id=0)
    try:
        source.save_pretrained(tmp_path)
    finally:
        source.generation_config = saved
    ours = qwen2.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    theirs = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ours.generation_config.max_new_tokens == 5
    ours_out, theirs_out = _both((ours, theirs), ids, attention_mask=mask)
    assert ours_out.shape[1] == ids.shape[1] + 5
    assert torch.equal(ours_out, theirs_out)


def test_attention_mask_is_inferred_from_pad_tokens(tiny_pair, prompts):
    ids, mask = prompts
    ours, theirs = _both(tiny_pair, ids, max_new_tokens=8, pad_token_id=0, eos_token_id=[95])
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, tiny_pair[0].generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0,
                                                   eos_token_id=[95]))


def test_generate_stream_yields_the_same_tokens(tiny_pair, prompts):
    ids, mask = prompts
    model = tiny_pair[0]
    full = model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    steps = list(model.generate_stream(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0))
    assert torch.equal(torch.stack(steps, dim=1), full[:, ids.shape[1]:])


def test_stop_strings_end_generation_on_the_completing_token(tiny_pair):
    """A tokenizer stand-in (id i -> the i-th letter) so stop strings run on a tiny model."""

    class Letters:
        def convert_ids_to_tokens(self, token_id):
            return chr(ord("A") + token_id % 26)

        def decode(self, ids):
            return "".join(self.convert_ids_to_tokens(i) for i in ids)

    model = tiny_pair[0]
    prompt = torch.tensor([[5, 6, 7]])
    free = model.generate(prompt, max_new_tokens=10)
    text = Letters().decode(free[0, 3:].tolist())
    stop = text[4:6]  # the 5th and 6th generated letters
    stopped = model.generate(prompt, max_new_tokens=10, stop_strings=stop, tokenizer=Letters())
    end = 3 + text.index(stop) + len(stop)
    assert torch.equal(stopped, free[:, :end])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=4, temperature=-1.0, do_sample=True), "temperature"),
        (dict(max_new_tokens=4, top_p=1.5, do_sample=True), "top_p"),
        (dict(max_new_tokens=4, top_k=-3, do_sample=True), "top_k"),
        (dict(max_new_tokens=4, stop_strings="x"), "tokenizer="),
        (dict(max_length=3), "max_length"),
        (dict(max_new_tokens=4, tempreature=0.5), "tempreature"),
        (dict(max_new_tokens=4, num_beams=2, streamer=object()), "streamer"),
        (dict(max_new_tokens=4, penalty_alpha=0.6, top_k=4), "penalty_alpha"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny_pair, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pair[0].generate(torch.tensor([[3, 4, 5, 6]]), **kwargs)


# --------------------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def seed_reference():
    return json.loads((REFERENCE_DIR / "seed_prompt_greedy.json").read_text())


@pytest.fixture(scope="module")
def seed_ids(seed_reference, hf_gguf_tokenizer):
    return hf_gguf_tokenizer(seed_reference["rendered_prompt"], return_tensors="pt")["input_ids"]


@pytest.mark.slow
def test_real_model_greedy_seed_prompt_matches_reference(our_gguf_model, hf_gguf_model, seed_reference, seed_ids):
    ours = our_gguf_model.generate(seed_ids, max_new_tokens=48, do_sample=False)
    assert ours[0, seed_ids.shape[1]:].tolist() == seed_reference["new_token_ids"]
    theirs = hf_gguf_model.generate(seed_ids, max_new_tokens=48, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_real_model_batch_with_left_padding_matches_transformers(our_gguf_model, hf_gguf_model, hf_gguf_tokenizer):
    """A left-padded batch of four prompts of different lengths: transformers' batched greedy tokens, and each
    row the tokens of its prompt alone."""
    texts = ["def fibonacci(n):", "The capital of France is", "Hi", "List three prime numbers bigger than ten:"]
    alone = [
        our_gguf_model.generate(hf_gguf_tokenizer(text, return_tensors="pt")["input_ids"], max_new_tokens=8)
        for text in texts
    ]
    hf_gguf_tokenizer.padding_side = "left"
    batch = hf_gguf_tokenizer(texts, return_tensors="pt", padding=True)
    together = our_gguf_model.generate(**batch, max_new_tokens=8)
    assert torch.equal(together, hf_gguf_model.generate(**batch, max_new_tokens=8, do_sample=False))
    width = batch["input_ids"].shape[1]
    for row, single in enumerate(alone):
        assert together[row, width:].tolist() == single[0, single.shape[1] - 8 :].tolist(), texts[row]


@pytest.mark.slow
def test_real_model_seeded_sampling_matches_transformers(our_gguf_model, hf_gguf_model, seed_ids):
    """Sampling draws from the same random stream as transformers (one torch.multinomial per step on the
    processed probabilities; the tiny-model tests pin that down for every option), so with the same seed the
    real model samples transformers' tokens, for seeds that sample different answers; the same seed again
    gives the same tokens."""
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    answers = []
    for seed in (1, 2, 3):
        ours = our_gguf_model.generate(seed_ids, seed=seed, **kwargs)
        torch.manual_seed(seed)
        assert torch.equal(ours, hf_gguf_model.generate(seed_ids, **kwargs)), seed
        answers.append(tuple(ours[0, seed_ids.shape[1]:].tolist()))
    assert len(set(answers)) > 1  # the seeds matter: the draws are compared, not a greedy answer
    assert our_gguf_model.generate(seed_ids, seed=1, **kwargs)[0, seed_ids.shape[1]:].tolist() == list(answers[0])


@pytest.fixture(scope="module")
def our_tokenizer(default_gguf):
    return qwen2.AutoTokenizer.from_pretrained(str(default_gguf))


@pytest.mark.slow
def test_real_model_stop_string_stops_exactly(our_gguf_model, our_tokenizer, seed_reference, seed_ids):
    reference = seed_reference["new_token_ids"]
    ours = our_gguf_model.generate(seed_ids, max_new_tokens=48, stop_strings=["intelligence"],
                                   tokenizer=our_tokenizer)
    new = ours[0, seed_ids.shape[1]:].tolist()
    text = our_tokenizer.decode(new)
    assert text.endswith("intelligence") and text.count("intelligence") == 1
    assert new == reference[: len(new)]


@pytest.mark.slow
def test_real_model_streamer_text_equals_decoded_output(our_gguf_model, our_tokenizer, seed_ids):
    streamer = TextIteratorStreamer(our_tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    result = {}

    def run():
        result["ids"] = our_gguf_model.generate(seed_ids, max_new_tokens=16, streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    chunks = list(streamer)
    thread.join()
    expected = our_tokenizer.decode(result["ids"][0, seed_ids.shape[1]:], skip_special_tokens=True)
    assert "".join(chunks) == expected
    assert len(chunks) > 5  # it streamed, not one final chunk


@pytest.mark.slow
def test_real_model_beam_search_matches_transformers(our_gguf_model, hf_gguf_model, hf_gguf_tokenizer):
    ids = hf_gguf_tokenizer("def quicksort(arr):", return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=16, num_beams=4, num_return_sequences=2, do_sample=False)
    ours = our_gguf_model.generate(ids, **kwargs)
    theirs = hf_gguf_model.generate(ids, **kwargs)
    assert torch.equal(ours, theirs)
