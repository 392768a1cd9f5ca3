"""The pure pieces of generation against transformers' own: logits processors on random logits,
stopping criteria (stop strings on a byte-level BPE), streamers' text chunks, and GenerationConfig."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.generation import logits_process as ref
from transformers.generation import stopping_criteria as ref_stop
from transformers.generation import streamers as ref_streamers

from qwen2.generation import GenerationConfig, TextIteratorStreamer
from qwen2.generation import logits as ours
from qwen2.generation.config import DEFAULT_GENERATION_PARAMS
from qwen2.generation import stopping

VOCAB = 50


def _inputs(batch: int = 3, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(0, VOCAB, (batch, length))
    input_ids[0, -4:] = input_ids[0, 2:6]  # a repeated 4-gram so n-gram bans have something to find
    scores = torch.randn(batch, VOCAB) * 3
    scores[1, :5] = 10.0  # ties at the top, to pin down tie handling
    return input_ids, scores


EOS = torch.tensor([3, 7])
PAIRS = [
    (ours.RepetitionPenalty(1.3), ref.RepetitionPenaltyLogitsProcessor(1.3)),
    (ours.RepetitionPenalty(0.7, torch.tensor([0, 4, 12])),
     ref.RepetitionPenaltyLogitsProcessor(0.7, prompt_ignore_length=torch.tensor([0, 4, 12]))),
    (ours.NoRepeatNGram(2), ref.NoRepeatNGramLogitsProcessor(2)),
    (ours.NoRepeatNGram(4), ref.NoRepeatNGramLogitsProcessor(4)),
    (ours.MinLength(20, EOS), ref.MinLengthLogitsProcessor(20, EOS)),
    (ours.MinLength(3, EOS, prompt_length=10), ref.MinNewTokensLengthLogitsProcessor(10, 3, EOS)),
    (ours.MinLength(1, EOS, prompt_length=10), ref.MinNewTokensLengthLogitsProcessor(10, 1, EOS)),
    (ours.ForceTokenAt(12, torch.tensor([4])), ref.ForcedEOSTokenLogitsProcessor(13, 4)),
    (ours.SuppressTokens([1, 2, 40]), ref.SuppressTokensLogitsProcessor([1, 2, 40])),
    (ours.SuppressTokens([5], at_length=12), ref.SuppressTokensAtBeginLogitsProcessor([5], 12)),
    # ids outside the vocabulary (or negative) are ignored, as by transformers' isin over the vocabulary
    (ours.SuppressTokens([2, 10_000, -1]), ref.SuppressTokensLogitsProcessor([2, 10_000, -1])),
    (ours.MinLength(20, torch.tensor([3, 10_000])), ref.MinLengthLogitsProcessor(20, torch.tensor([3, 10_000]))),
    (ours.Temperature(0.6), ref.TemperatureLogitsWarper(0.6)),
    (ours.TopK(5), ref.TopKLogitsWarper(5)),
    (ours.TopK(1, min_tokens_to_keep=3), ref.TopKLogitsWarper(1, min_tokens_to_keep=3)),
    (ours.TopP(0.8), ref.TopPLogitsWarper(0.8)),
    (ours.TopP(0.3, min_tokens_to_keep=3), ref.TopPLogitsWarper(0.3, min_tokens_to_keep=3)),
    (ours.MinP(0.1), ref.MinPLogitsWarper(0.1)),
    (ours.MinP(0.9, min_tokens_to_keep=2), ref.MinPLogitsWarper(0.9, min_tokens_to_keep=2)),
    (ours.TypicalP(0.7), ref.TypicalLogitsWarper(0.7)),
    (ours.EpsilonCutoff(0.02), ref.EpsilonLogitsWarper(0.02)),
    (ours.EpsilonCutoff(0.05, eta=True), ref.EtaLogitsWarper(0.05)),
    (ours.renormalize, ref.LogitNormalization()),
]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: type(p[1]).__name__)
def test_processor_matches_transformers(pair):
    mine, theirs = pair
    input_ids, scores = _inputs()
    torch.testing.assert_close(mine(input_ids, scores.clone()), theirs(input_ids, scores.clone()))


def test_remove_invalid_values_matches_transformers():
    input_ids, scores = _inputs()
    scores[0, 1], scores[1, 2], scores[2, 3] = float("nan"), float("inf"), -float("inf")
    expected = ref.InfNanRemoveLogitsProcessor()(input_ids, scores.clone())
    torch.testing.assert_close(ours.remove_invalid_values(input_ids, scores.clone()), expected)


class _Model(transformers.GenerationMixin):
    """Just enough of a model for transformers' `_get_logits_processor`."""

    class config:  # noqa: N801 - mirrors `model.config`
        is_encoder_decoder = False


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.1),
        dict(do_sample=True, top_k=0, typical_p=0.9, epsilon_cutoff=0.01, no_repeat_ngram_size=3),
        dict(do_sample=False, min_new_tokens=2, min_length=15, suppress_tokens=[9], renormalize_logits=True),
        dict(do_sample=True, num_beams=3, top_k=2, top_p=0.5, eta_cutoff=0.1),
    ],
)
def test_processor_chain_matches_transformers_order(kwargs):
    """The whole chain built from a config equals transformers' chain built from the same config."""
    full = {**DEFAULT_GENERATION_PARAMS, **kwargs, "max_length": 30, "eos_token_id": [3, 7]}
    ref_config = transformers.GenerationConfig(**full)
    ref_config._eos_token_tensor = EOS
    theirs = transformers.GenerationMixin._get_logits_processor(_Model(), ref_config, input_ids_seq_length=12)
    mine = ours.build_logits_processors(GenerationConfig(**full), prompt_length=12, eos_token_id=EOS)
    input_ids, scores = _inputs()
    torch.testing.assert_close(
        ours.apply_processors(mine, input_ids, scores.clone()), theirs(input_ids, scores.clone())
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ours.Temperature(-0.5), "temperature"),
        (lambda: ours.Temperature(0.0), "do_sample=False"),
        (lambda: ours.TopP(1.5), "top_p"),
        (lambda: ours.TopP(-0.1), "top_p"),
        (lambda: ours.TopK(-1), "top_k"),
        (lambda: ours.MinP(2.0), "min_p"),
        (lambda: ours.RepetitionPenalty(0.0), "repetition_penalty"),
        (lambda: ours.NoRepeatNGram(0), "no_repeat_ngram_size"),
        (lambda: ours.TypicalP(1.0), "typical_p"),
    ],
)
def test_bad_values_are_rejected_like_transformers(make, message):
    with pytest.raises(ValueError, match=message):
        make()


EOS_IDS = torch.tensor([3, 7])


@pytest.mark.parametrize(
    "mine, theirs, values",
    [
        (ours.Temperature, ref.TemperatureLogitsWarper, [-0.5, 0.0, 0, 1, 1e-9, 0.7, 2.0, float("inf")]),
        (ours.TopK, ref.TopKLogitsWarper, [-1, 0, 0.0, 1.5, 1, 5, True]),
        (ours.TopP, ref.TopPLogitsWarper, [-0.1, 0, 0.0, 0.5, 1, 1.0, 1.5]),
        (ours.MinP, ref.MinPLogitsWarper, [-0.1, 0, 0.0, 0.5, 1.0, 2.0]),
        (ours.TypicalP, ref.TypicalLogitsWarper, [-0.1, 0.0, 0.5, 0.99, 1, 1.0, 1.5]),
        (ours.EpsilonCutoff, ref.EpsilonLogitsWarper, [-0.1, 0.0, 0.5, 1, 1.0, 1.5]),
        (lambda v: ours.EpsilonCutoff(v, eta=True), ref.EtaLogitsWarper, [-0.1, 0.0, 0.5, 1.0, 1.5]),
        (ours.RepetitionPenalty, ref.RepetitionPenaltyLogitsProcessor, [-1.0, 0, 0.0, 1, 0.5, 1.0, 2.0]),
        (ours.NoRepeatNGram, ref.NoRepeatNGramLogitsProcessor, [-1, 0, 1.5, 1, 3]),
        (lambda v: ours.MinLength(v, EOS_IDS), lambda v: ref.MinLengthLogitsProcessor(v, EOS_IDS), [-1, 1.5, 0, 3]),
    ],
)
def test_values_are_refused_exactly_where_transformers_refuses_them(mine, theirs, values):
    """Ours raises ValueError for a value if and only if transformers' processor does (boundaries, ints
    for floats, floats for ints): we refuse no more, no less."""

    def refused(make, value) -> bool:
        try:
            make(value)
        except ValueError:
            return True
        return False

    assert [refused(mine, v) for v in values] == [refused(theirs, v) for v in values]


def test_unsupported_fields_are_refused_by_name():
    with pytest.raises(ValueError, match="force_words_ids"):
        ours.check_supported(GenerationConfig(force_words_ids=[[1]]))
    ours.check_supported(GenerationConfig(guidance_scale=1.0, num_beam_groups=1))


# --------------------------------------------------------------------------- stopping


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE (the Qwen2 kind), trained here, wrapped the way transformers wraps Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["stop the top stopper, please stop!", "Hello world. Hello there.\n", "日本語のテキスト 🙂 café"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>"]
    )
    tok.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


@pytest.mark.parametrize("stops", [["stop"], ["top s", "!"], ["o"], ["Hello there", "é"], ["語の"]])
def test_stop_strings_match_transformers_at_every_prefix(bpe_tokenizer, stops):
    text = "stop the top stopper, please stop! Hello there. 日本語のテキスト café 🙂"
    ids = bpe_tokenizer(text)["input_ids"]
    mine = stopping.StopStrings(stops, bpe_tokenizer)
    theirs = ref_stop.StopStringCriteria(bpe_tokenizer, stops)
    hits = []
    for end in range(1, len(ids) + 1):
        prefix = torch.tensor([ids[:end]])
        expected = bool(theirs(prefix, None)[0])
        assert bool(mine(prefix)[0]) == expected, (stops, end, bpe_tokenizer.decode(ids[:end]))
        hits.append(expected)
    assert any(hits)  # the text holds every stop string: the comparison exercised real matches


def test_stop_strings_random_substrings_match_transformers(bpe_tokenizer):
    """Stop strings cut at random places of the text (spanning tokens, partial tokens, multi-byte chars)."""
    text = "stop the top stopper, please stop! Hello there. 日本語のテキスト café 🙂"
    ids = bpe_tokenizer(text)["input_ids"]
    rng = torch.Generator().manual_seed(0)
    for _ in range(15):
        start = int(torch.randint(0, len(text) - 1, (1,), generator=rng))
        stop = text[start : start + int(torch.randint(1, 7, (1,), generator=rng))]
        mine = stopping.StopStrings([stop], bpe_tokenizer)
        theirs = ref_stop.StopStringCriteria(bpe_tokenizer, [stop])
        hits = 0
        for end in range(1, len(ids) + 1):
            prefix = torch.tensor([ids[:end]])
            expected = bool(theirs(prefix, None)[0])
            assert bool(mine(prefix)[0]) == expected, (stop, end)
            hits += expected
        assert hits > 0  # the stop string is in the text, so it fires somewhere


def test_text_streamer_prints_what_transformers_prints(bpe_tokenizer, capsys):
    from qwen2.generation import TextStreamer

    ids = bpe_tokenizer("Hello there.\nstop the top 🙂 café", return_tensors="pt")["input_ids"]
    printed = []
    for streamer in (TextStreamer(bpe_tokenizer), ref_streamers.TextStreamer(bpe_tokenizer)):
        streamer.put(ids[:, :2])
        for token in ids[0, 2:]:
            streamer.put(token[None])
        streamer.end()
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] == "Hello there.\nstop the top 🙂 café\n"


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer="):
        stopping.StopStrings(["x"], None)


def test_eos_and_max_length_criteria():
    input_ids = torch.tensor([[1, 2, 3], [1, 2, 7], [1, 2, 5]])
    assert stopping.EosToken(EOS)(input_ids).tolist() == [True, True, False]
    assert stopping.MaxLength(3)(input_ids).tolist() == [True] * 3
    assert stopping.MaxLength(4)(input_ids).tolist() == [False] * 3


# --------------------------------------------------------------------------- streamers


@pytest.mark.parametrize("skip_prompt", [False, True])
def test_streamer_chunks_match_transformers(bpe_tokenizer, skip_prompt):
    """Same chunks as transformers' streamer, token by token, including partial UTF-8 and CJK text."""
    prompt = bpe_tokenizer("Hello", return_tensors="pt")["input_ids"]
    text = " there.\nstop the top 🙂 café 日本語のテキスト, please stop!"
    generated = bpe_tokenizer(text)["input_ids"]
    mine = TextIteratorStreamer(bpe_tokenizer, skip_prompt=skip_prompt)
    theirs = ref_streamers.TextIteratorStreamer(bpe_tokenizer, skip_prompt=skip_prompt)
    for streamer in (mine, theirs):
        streamer.put(prompt)
        for token in generated:
            streamer.put(torch.tensor([token]))
        streamer.end()
    chunks = list(mine)
    assert chunks == list(theirs)
    assert "".join(chunks) == ("" if skip_prompt else "Hello") + text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_streamer_refuses_batches(bpe_tokenizer):
    with pytest.raises(ValueError, match="batch size 1"):
        TextIteratorStreamer(bpe_tokenizer).put(torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------- GenerationConfig


def test_generation_config_json_round_trip_with_transformers(tmp_path):
    fields = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                  eos_token_id=[151645, 151643], pad_token_id=151643, max_new_tokens=64, custom_field="kept")
    ours_dir, ref_dir = tmp_path / "ours", tmp_path / "ref"
    GenerationConfig(**fields).save_pretrained(ours_dir)
    transformers.GenerationConfig(**fields).save_pretrained(ref_dir)
    saved = json.loads((ours_dir / "generation_config.json").read_text())
    expected = json.loads((ref_dir / "generation_config.json").read_text())
    expected.pop("transformers_version")
    assert saved == expected
    loaded_by_ref = transformers.GenerationConfig.from_pretrained(ours_dir)
    loaded_by_us = GenerationConfig.from_pretrained(ref_dir)
    for name, value in fields.items():
        assert getattr(loaded_by_ref, name) == value
        assert getattr(loaded_by_us, name) == value
    assert GenerationConfig.from_pretrained(ours_dir) == GenerationConfig(**fields)
    assert loaded_by_us.transformers_version == transformers.__version__  # metadata kept on a re-save


def test_generation_config_to_dict_has_transformers_fields():
    mine = GenerationConfig(max_new_tokens=5).to_dict()
    theirs = transformers.GenerationConfig(max_new_tokens=5).to_dict()
    assert set(mine) == set(theirs)
    assert {k: v for k, v in mine.items() if k != "transformers_version"} == {
        k: v for k, v in theirs.items() if k != "transformers_version"
    }


def test_generation_config_from_model_config_matches_transformers():
    model_config = transformers.Qwen2Config(bos_token_id=1, eos_token_id=2, pad_token_id=0, vocab_size=64)
    mine = GenerationConfig.from_model_config(model_config.to_dict())
    theirs = transformers.GenerationConfig.from_model_config(model_config)
    assert mine.to_diff_dict() == theirs.to_diff_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    ],
)
def test_generation_config_rejects_what_transformers_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)
    with pytest.raises(ValueError):
        transformers.GenerationConfig(**kwargs)


def test_generation_config_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="generation_config.json"):
        GenerationConfig.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(OSError, match="not valid JSON"):
        GenerationConfig.from_pretrained(tmp_path)
