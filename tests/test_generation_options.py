"""generate() options beyond the basics, against transformers' generate() on the same tiny random weights:
bad_words_ids, sequence_bias, prefix_allowed_tokens_fn, exponential_decay_length_penalty (greedy, sampling and
beam search; left-padded batches), inputs_embeds=, past_key_values= (a cached shared prefix), and refusals of
outputs we do not produce."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import qwen2

from test_generation import TINY, tiny_pair  # noqa: F401 (a fixture)

STRATEGIES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20),
    "beams": dict(num_beams=3, num_return_sequences=2),
}


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair


@pytest.fixture(scope="module")
def prompts():
    ids = torch.randint(3, TINY["vocab_size"], (3, 8), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def _both(pair, prompts, **kwargs):
    ids, mask = prompts
    outputs = []
    for model in pair:
        torch.manual_seed(5)
        outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0,
                                      **copy.deepcopy(kwargs)))
    return outputs


@pytest.fixture(scope="module")
def plain(pair, prompts):
    """transformers' unconstrained greedy continuation: the tokens the options below must change."""
    return _both(pair, prompts, do_sample=False)[1][:, prompts[0].shape[1]:]


def _options(name, plain):
    first, second, third = (int(t) for t in plain[0, :3])
    return {
        "bad_words": dict(bad_words_ids=[[first], [second, third], [2]]),  # [2] is eos: never banned
        "sequence_bias_dict": dict(sequence_bias={(first,): -4.0, (second, third): 9.0, (int(plain[2, 0]),): 3.5}),
        "sequence_bias_list": dict(sequence_bias=[[[first, second], -20.0], [[7], 2.5]]),
        "prefix_allowed": dict(prefix_allowed_tokens_fn=lambda batch_id, row: [3 + batch_id, 10, 20 + len(row) % 7]),
        "exponential_decay": dict(exponential_decay_length_penalty=(2, 1.8), eos_token_id=[int(plain[0, 5]), 9]),
    }[name]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("name", ["bad_words", "sequence_bias_dict", "sequence_bias_list", "prefix_allowed",
                                  "exponential_decay"])
def test_option_matches_transformers(pair, prompts, plain, name, strategy):
    options = {**_options(name, plain), **STRATEGIES[strategy]}
    ours, theirs = _both(pair, prompts, **options)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    if strategy == "greedy":
        assert not torch.equal(theirs[:, prompts[0].shape[1]:][:, :plain.shape[1]], plain[:, :theirs.shape[1] - 8])


def test_scores_with_bias_options_match_transformers(pair, prompts, plain):
    options = dict(do_sample=False, output_scores=True, return_dict_in_generate=True,
                   **_options("sequence_bias_dict", plain), **_options("exponential_decay", plain))
    ours, theirs = _both(pair, prompts, **options)
    for mine, reference in zip(ours.scores, theirs.scores):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bad_words_ids=[[]]), "bad_words_ids"),
    (dict(bad_words_ids=[[500]]), "vocabulary size"),
    (dict(sequence_bias={(3,): 1}), "sequence_bias"),
    (dict(exponential_decay_length_penalty=(2,)), "exponential_decay_length_penalty"),
    (dict(prefix_allowed_tokens_fn=lambda batch_id, row: []), "prefix_allowed_tokens_fn"),
])
def test_bad_option_values_are_clear_errors(pair, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pair[0].generate(prompts[0], attention_mask=prompts[1], max_new_tokens=3, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("strategy", ["greedy", "sampling"])
@pytest.mark.parametrize("with_ids", [False, True], ids=["embeds_only", "ids_and_embeds"])
def test_inputs_embeds_prompt_matches_transformers(pair, prompts, strategy, with_ids):
    ids, mask = prompts
    embeds = pair[1].get_input_embeddings()(ids).detach() * 1.5  # not what the ids alone would give
    outputs = []
    for model in pair:
        torch.manual_seed(5)
        outputs.append(model.generate(ids if with_ids else None, inputs_embeds=embeds, attention_mask=mask,
                                      max_new_tokens=7, pad_token_id=0, repetition_penalty=1.3,
                                      **STRATEGIES[strategy]))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    assert outputs[0].shape[1] == (ids.shape[1] if with_ids else 0) + 7
    if with_ids:
        assert not torch.equal(outputs[0], pair[0].generate(ids, attention_mask=mask, max_new_tokens=7,
                                                            pad_token_id=0, repetition_penalty=1.3))


def test_inputs_embeds_with_max_length_counts_new_tokens_as_transformers(pair, prompts):
    ids, mask = prompts
    embeds = pair[1].get_input_embeddings()(ids).detach()
    ours, theirs = (m.generate(inputs_embeds=embeds, attention_mask=mask, max_length=12, pad_token_id=0)
                    for m in pair)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_generate_continues_from_a_cached_shared_prefix_as_transformers(pair):
    """transformers' documented prefix reuse: run the shared prefix once, deep-copy its cache per prompt, and pass
    the whole prompt with it; then continue the conversation with the extended cache."""
    ours, theirs = pair
    generator = torch.Generator().manual_seed(11)
    prefix = torch.randint(3, TINY["vocab_size"], (1, 6), generator=generator)
    with torch.no_grad():
        our_prefix = ours(prefix, past_key_values=qwen2.DynamicCache()).past_key_values
        their_prefix = theirs(prefix, past_key_values=transformers.DynamicCache()).past_key_values
    for _ in range(2):
        prompt = torch.cat([prefix, torch.randint(3, TINY["vocab_size"], (1, 4), generator=generator)], dim=1)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        our_cache, their_cache = copy.deepcopy(our_prefix), copy.deepcopy(their_prefix)
        got = ours.generate(prompt, past_key_values=our_cache, **kwargs)
        expected = theirs.generate(prompt, past_key_values=their_cache, **kwargs)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        torch.testing.assert_close(got, ours.generate(prompt, **kwargs), atol=0, rtol=0)
        assert our_cache.get_seq_length() == their_cache.get_seq_length() == got.shape[1] - 1
        for mine, reference in zip(our_cache.layers, their_cache.layers):
            torch.testing.assert_close(mine.keys, reference.keys, atol=1e-5, rtol=0)
        follow_up = torch.cat([got, torch.randint(3, TINY["vocab_size"], (1, 3), generator=generator)], dim=1)
        torch.testing.assert_close(ours.generate(follow_up, past_key_values=our_cache, **kwargs),
                                   theirs.generate(follow_up, past_key_values=their_cache, **kwargs), atol=0, rtol=0)


def test_an_empty_cache_passed_to_generate_is_filled_for_the_next_turn_as_in_transformers(pair):
    """transformers' multi-turn pattern: pass an empty DynamicCache on the first turn and the same object after."""
    ours, theirs = pair
    generator = torch.Generator().manual_seed(12)
    caches = [qwen2.DynamicCache(), transformers.DynamicCache()]
    history = torch.randint(3, TINY["vocab_size"], (1, 5), generator=generator)
    for _ in range(2):
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        got = ours.generate(history, past_key_values=caches[0], **kwargs)
        expected = theirs.generate(history, past_key_values=caches[1], **kwargs)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert caches[0].get_seq_length() == caches[1].get_seq_length() == got.shape[1] - 1
        history = torch.cat([got, torch.randint(3, TINY["vocab_size"], (1, 3), generator=generator)], dim=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(output_hidden_states=True, return_dict_in_generate=True, num_beams=2), "output_hidden_states"),
    (dict(output_attentions=True, return_dict_in_generate=True, num_beams=2), "output_attentions"),
    (dict(inputs_embeds=torch.zeros(3, 8, 5)), "inputs_embeds"),
    (dict(inputs_embeds=torch.zeros(3, 8, 64), num_beams=2), "beam search"),
    (dict(past_key_values=object()), "past_key_values"),
    (dict(cache_implementation="quantized"), "cache_implementation"),
])
def test_unsupported_outputs_and_bad_prompt_inputs_are_refused(pair, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pair[0].generate(prompts[0], attention_mask=prompts[1], max_new_tokens=3, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("prompt", ["ids", "embeds", "cached_prefix"])
def test_hidden_states_and_attentions_per_step_match_transformers(pair, prompts, prompt):
    ids, mask = prompts
    kwargs = dict(max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0, eos_token_id=[7, 9],
                  output_hidden_states=True, output_attentions=True, return_dict_in_generate=True)
    outputs = []
    pair[1].set_attn_implementation("eager")  # transformers' SDPA returns no attentions (empty tuples)
    try:
        for model, cache_class in zip(pair, (qwen2.DynamicCache, transformers.DynamicCache)):
            torch.manual_seed(5)
            if prompt == "ids":
                outputs.append(model.generate(ids, attention_mask=mask, **kwargs))
            elif prompt == "embeds":
                embeds = pair[1].get_input_embeddings()(ids).detach()
                outputs.append(model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs))
            else:
                with torch.no_grad():
                    cache = model(ids[:1, :5], past_key_values=cache_class()).past_key_values
                outputs.append(model.generate(ids[:1], past_key_values=cache, **kwargs))
    finally:
        pair[1].set_attn_implementation("sdpa")
    ours, theirs = outputs
    torch.testing.assert_close(ours.sequences, theirs.sequences, atol=0, rtol=0)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == len(ours.attentions) == len(theirs.attentions)
    for kind in ("hidden_states", "attentions"):
        for step, (mine, reference) in enumerate(zip(getattr(ours, kind), getattr(theirs, kind))):
            assert len(mine) == len(reference) > 0
            for a, b in zip(mine, reference):
                assert a.shape == b.shape
                if step == 0 and prompt != "cached_prefix":  # the padded row's pad positions carry no meaning
                    a, b = a[[0, 2]], b[[0, 2]]
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("implementation", ["static", "dynamic"])
def test_cache_implementation_static_or_dynamic_gives_transformers_tokens(pair, prompts, implementation):
    ours, theirs = _both(pair, prompts, do_sample=False, cache_implementation=implementation,
                         return_dict_in_generate=True)
    torch.testing.assert_close(ours.sequences, theirs.sequences, atol=0, rtol=0)
    assert isinstance(ours.past_key_values, qwen2.StaticCache)  # what generate() decodes on


# --------------------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_real_model_shared_system_prompt_cache_and_biases_match_transformers(our_gguf_model, hf_gguf_model,
                                                                              hf_gguf_tokenizer):
    """The chat template's system prompt run once and reused for two questions, with banned words and a sequence
    bias, greedy, token for token as transformers on the same GGUF (float32)."""
    system = [{"role": "system", "content": "You are a terse assistant."}]
    prefix_text = hf_gguf_tokenizer.apply_chat_template(system, tokenize=False)
    prefix = hf_gguf_tokenizer(prefix_text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        our_prefix = our_gguf_model(prefix, past_key_values=qwen2.DynamicCache()).past_key_values
        their_prefix = hf_gguf_model(prefix, past_key_values=transformers.DynamicCache()).past_key_values
    for question in ("What is 2+2?", "Name a prime number."):
        messages = system + [{"role": "user", "content": question}]
        text = hf_gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = hf_gguf_tokenizer(text, return_tensors="pt")["input_ids"]
        assert torch.equal(ids[:, :prefix.shape[1]], prefix)
        plain = hf_gguf_model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
        kwargs = dict(max_new_tokens=6, do_sample=False, bad_words_ids=[[int(plain[0])]],
                      sequence_bias={(int(plain[1]),): 2.0})
        got = our_gguf_model.generate(ids, past_key_values=copy.deepcopy(our_prefix), **kwargs)
        expected = hf_gguf_model.generate(ids, past_key_values=copy.deepcopy(their_prefix), **kwargs)
        assert got.tolist() == expected.tolist()
        assert int(got[0, ids.shape[1]]) != int(plain[0])


@pytest.mark.slow
def test_real_model_transition_scores_match_transformers(our_gguf_model, hf_gguf_model, hf_gguf_tokenizer):
    ids = hf_gguf_tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ours, theirs = (model.generate(ids, **kwargs) for model in (our_gguf_model, hf_gguf_model))
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    mine = our_gguf_model.compute_transition_scores(ours.sequences, ours.scores, normalize_logits=True)
    reference = hf_gguf_model.compute_transition_scores(theirs.sequences, theirs.scores, normalize_logits=True)
    torch.testing.assert_close(mine, reference, atol=1e-3, rtol=0)
