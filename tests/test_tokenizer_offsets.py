"""Offsets, overflow with stride, and BatchEncoding's token/word/character alignment, for Qwen2Tokenizer (pure
Python) and Qwen2TokenizerFast against transformers' Qwen2Tokenizer (tokenizers-backed, the oracle) on the real
Qwen2.5 vocabulary written from the default GGUF."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2.tokenizer import Qwen2Tokenizer, Qwen2TokenizerFast
from qwen2.tokenizer.normalize import nfc, nfc_aligned
from tokenizer_corpus import corpus

import transformers  # noqa: E402  (the oracle; a test dependency)


@pytest.fixture(scope="module")
def left_truncating(tok_dir):
    return {cls: cls.from_pretrained(tok_dir, truncation_side="left") for cls in (Qwen2Tokenizer, Qwen2TokenizerFast)}


@pytest.fixture(scope="module")
def texts():
    return corpus()


def _alignment(encoding):
    return (encoding.ids, encoding.tokens, [tuple(o) for o in encoding.offsets], encoding.word_ids,
            encoding.sequence_ids, encoding.type_ids, encoding.attention_mask, encoding.special_tokens_mask)


def _rows(batch):
    return {key: [[tuple(o) if isinstance(o, (list, tuple)) else o for o in row] if isinstance(row, list) else row
                  for row in value] if isinstance(value, list) and value and isinstance(value[0], list) else value
            for key, value in batch.items()}


# ---- offsets and words on the corpus -------------------------------------------------------------
def test_corpus_offsets_words_and_tokens(ours, hf, texts):
    """Every string of the corpus (unicode, NFD/NFKD forms, emoji, CJK, code, whitespace runs, special tokens):
    ids, token strings, character offsets and word ids exactly as transformers gives them."""
    mine = ours(texts, return_offsets_mapping=True)
    theirs = hf(texts, return_offsets_mapping=True)
    assert mine["input_ids"] == theirs["input_ids"]
    assert mine["offset_mapping"] == theirs["offset_mapping"]
    for index in range(len(texts)):
        assert mine.tokens(index) == theirs.tokens(index), texts[index]
        assert mine.word_ids(index) == theirs.word_ids(index), texts[index]
        assert mine.sequence_ids(index) == theirs.sequence_ids(index)


def test_offsets_of_normalised_and_split_characters(ours, hf):
    """Where NFC composes, reorders or inserts characters, and tokens hold part of a character's bytes."""
    cases = [
        "e\u0301x", "cafe\u0301 ok", "a\u0307\u0323b", "a\u0323\u0307b", "\u1100\u1161\u11a8 \u1100\u1161",
        "\u0958\u0959 x", "\u212b\u2126", "x\u0301\u0301\u0301y", "\u0f73\u0f75", "\u1e9b\u0323", "\U0001d15e",
        "q\u0307\u0323 \u0041\u030a\u0301", "😀👍🏽👨\u200d👩\u200d👧", "🇫🇷 flag", "\u00e9\u0301\u0327",
        "  \n\t \u3000x", "<|im_start|>e\u0301<|im_end|>", "\ufb01 \u2460", "\ud7a3\u11a8",
    ]
    cases += [unicodedata.normalize("NFD", c) for c in cases] + [unicodedata.normalize("NFKD", c) for c in cases]
    for text in cases:
        mine, theirs = ours(text, return_offsets_mapping=True), hf(text, return_offsets_mapping=True)
        assert dict(mine) == dict(theirs), text
        assert mine.word_ids() == theirs.word_ids(), text


def test_nfc_aligned_text_is_nfc(texts):
    for text in texts:
        normalized, origin = nfc_aligned(text)
        assert normalized == nfc(text)
        assert origin is None or len(origin) == len(normalized)


def test_alignment_methods_match_transformers(ours, hf, texts):
    """char_to_token / char_to_word at every character, token_to_chars / token_to_word / token_to_sequence at
    every token, word_to_tokens / word_to_chars for every word."""
    sample = texts[::12] + ["hello  world\n\n<|im_end|>x", ""]
    mine, theirs = ours(sample, padding=True), hf(sample, padding=True)  # padding: None-mapped pad tokens
    for row, text in enumerate(sample):
        n_tokens = len(theirs["input_ids"][row])
        words = {w for w in theirs.word_ids(row) if w is not None}
        for char in range(len(text) + 1):
            assert mine.char_to_token(row, char) == theirs.char_to_token(row, char), (text, char)
            assert mine.char_to_word(row, char) == theirs.char_to_word(row, char), (text, char)
        for token in range(n_tokens):
            assert mine.token_to_chars(row, token) == theirs.token_to_chars(row, token), (text, token)
            assert mine.token_to_word(row, token) == theirs.token_to_word(row, token)
            assert mine.token_to_sequence(row, token) == theirs.token_to_sequence(row, token)
        for word in sorted(words) + [max(words, default=0) + 1]:
            assert mine.word_to_tokens(row, word) == theirs.word_to_tokens(row, word), (text, word)
            if word in words:
                assert mine.word_to_chars(row, word) == theirs.word_to_chars(row, word)
    single_mine, single_theirs = ours(sample[3]), hf(sample[3])
    assert single_mine.char_to_token(2) == single_theirs.char_to_token(2)
    assert single_mine.token_to_chars(1) == single_theirs.token_to_chars(1)
    assert single_mine.word_to_tokens(0) == single_theirs.word_to_tokens(0)
    assert type(single_mine.token_to_chars(1)).__name__ == "CharSpan"
    assert type(single_mine.word_to_tokens(0)).__name__ == "TokenSpan"


def test_pairs_and_pretokenized_words(ours, hf):
    kwargs = {"return_offsets_mapping": True, "return_token_type_ids": True}
    first, second = ["Hello world", "naïve café", "x", ""], ["How are you?", "😀 <|im_end|> ok", "e\u0301", "abc def"]
    for mine, theirs in [(ours(first, second, **kwargs), hf(first, second, **kwargs)),
                         (ours(first, second, padding=True, **kwargs), hf(first, second, padding=True, **kwargs)),
                         (ours(first, second, padding=True, padding_side="left", **kwargs),
                          hf(first, second, padding=True, padding_side="left", **kwargs))]:
        assert _rows(mine) == _rows(theirs)
        for row in range(len(first)):
            assert _alignment(mine.encodings[row]) == _alignment(theirs.encodings[row])
            assert mine.encodings[row].n_sequences == theirs.encodings[row].n_sequences == 2
            for char in range(12):
                for sequence in (0, 1):
                    assert mine.char_to_token(row, char, sequence_index=sequence) == \
                        theirs.char_to_token(row, char, sequence_index=sequence)
            for sequence in (0, 1):
                assert mine.word_to_tokens(row, 0, sequence_index=sequence) == \
                    theirs.word_to_tokens(row, 0, sequence_index=sequence)
    words = [["Hello", " wor ld", "x<|im_end|>y", "日本語"], ["e\u0301", "a"]]
    mine = ours(words, is_split_into_words=True, return_offsets_mapping=True, padding=True)
    theirs = hf(words, is_split_into_words=True, return_offsets_mapping=True, padding=True)
    assert _rows(mine) == _rows(theirs)
    assert [mine.word_ids(i) for i in range(2)] == [theirs.word_ids(i) for i in range(2)]


# ---- truncation with overflow and stride -----------------------------------------------------------
OVERFLOW_CASES = [
    ({"max_length": 4}, None),
    ({"max_length": 4, "stride": 1}, None),
    ({"max_length": 5, "stride": 3}, None),
    ({"max_length": 1}, None),
    ({"max_length": 0}, None),
    ({"max_length": 4, "stride": 2, "padding": True}, None),
    ({"max_length": 6, "stride": 1, "padding": "max_length", "return_length": True}, None),
    ({"max_length": 8, "stride": 2, "padding": True, "pad_to_multiple_of": 4}, None),
    ({"max_length": 5, "stride": 1}, "pair"),
    ({"max_length": 16, "stride": 2, "truncation": "only_second"}, "swapped"),
    ({"max_length": 16, "stride": 1, "truncation": "only_first", "padding": True}, "pair"),
    ({"max_length": 7, "stride": 1, "truncation": "longest_first", "return_token_type_ids": True}, "pair"),
]
LONG = ["The quick brown fox jumps over the lazy dog, 12345 times! 你好世界 😀😀",
        "def f(x):\n    return x ** 2  # <|im_end|> square",
        "short", ""]
PAIRS = ["What is it?", "naïve e\u0301 question with several words in it", "a b", "<|im_start|>"]


@pytest.mark.parametrize("kwargs,kind", OVERFLOW_CASES, ids=[str(c) for c in OVERFLOW_CASES])
@pytest.mark.parametrize("side", ["right", "left"])
def test_overflowing_tokens_match_transformers(ours, hf, left_truncating, kwargs, kind, side):
    kwargs = {"truncation": True, "return_overflowing_tokens": True, "return_offsets_mapping": True, **kwargs}
    first, second = {None: (LONG, None), "pair": (LONG, PAIRS), "swapped": (PAIRS, LONG)}[kind]
    hf.truncation_side = side
    try:
        theirs = hf(first, second, **kwargs)
        mine = (ours if side == "right" else left_truncating[type(ours)])(first, second, **kwargs)
    finally:
        hf.truncation_side = "right"
    assert _rows(mine) == _rows(theirs)
    assert len(mine.encodings) == len(theirs.encodings) == len(theirs["input_ids"])
    for row in range(len(theirs["input_ids"])):
        assert _alignment(mine.encodings[row]) == _alignment(theirs.encodings[row]), row


def test_overflow_single_text_stays_batched_and_tensors(ours, hf):
    text = LONG[0]
    kwargs = {"max_length": 6, "stride": 2, "truncation": True, "return_overflowing_tokens": True}
    assert _rows(ours(text, **kwargs)) == _rows(hf(text, **kwargs))
    mine = ours(text, padding="max_length", return_tensors="pt", return_offsets_mapping=True, **kwargs)
    theirs = hf(text, padding="max_length", return_tensors="pt", return_offsets_mapping=True, **kwargs)
    assert set(mine) == set(theirs)
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype and mine[key].tolist() == theirs[key].tolist(), key
    plain = {"max_length": 6, "truncation": True}
    # Without return_overflowing_tokens the windows are still on the encoding, as in `tokenizers`.
    assert [e.ids for e in ours(text, **plain).encodings[0].overflowing] == \
        [e.ids for e in hf(text, **plain).encodings[0].overflowing]


def test_stride_not_below_the_window_is_refused(ours, hf):
    kwargs = {"max_length": 3, "stride": 3, "truncation": True, "return_overflowing_tokens": True}
    with pytest.raises(BaseException, match="stride"):  # tokenizers panics (PanicException)
        hf(LONG[0], **kwargs)
    with pytest.raises(ValueError, match="stride=3 must be smaller"):
        ours(LONG[0], **kwargs)
    with pytest.raises(ValueError, match="stride=-1"):
        ours(LONG[0], stride=-1)
    for first, second, strategy in [("ab cd", "x", "only_second"), ("x", "ab cd", "only_first"),
                                    (LONG[0], "a", "only_second")]:
        kwargs = {"max_length": 2, "truncation": strategy}
        for overflow in (False, True):
            with pytest.raises(Exception, match="too short"):
                hf(first, second, return_overflowing_tokens=overflow, **kwargs)
            with pytest.raises(ValueError, match=f"truncation='{strategy}' cannot reach max_length=2"):
                ours(first, second, return_overflowing_tokens=overflow, **kwargs)


def test_plain_calls_compute_alignment_on_demand(ours, hf, texts):
    """The usual call does not pay for offsets; word_ids() etc. still answer, from the same padding and truncation."""
    sample = texts[::97]
    kwargs = {"padding": True, "truncation": True, "max_length": 7, "padding_side": "left"}
    mine, theirs = ours(sample, **kwargs), hf(sample, **kwargs)
    assert callable(mine._encodings)
    assert mine.is_fast and theirs.is_fast
    assert [mine.word_ids(i) for i in range(len(sample))] == [theirs.word_ids(i) for i in range(len(sample))]
    assert [_alignment(e) for e in mine.encodings] == [_alignment(e) for e in theirs.encodings]
    assert _alignment(mine[0]) == _alignment(theirs[0])
    assert mine["input_ids"] == theirs["input_ids"]


def test_added_normalized_token_offsets(tok_dir):
    """A user-added token (normalized=True, matched after NFC) inside text NFC changes."""
    mine_pair = Qwen2Tokenizer.from_pretrained(tok_dir), Qwen2TokenizerFast.from_pretrained(tok_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    theirs.add_tokens(["<think>", "café"])
    text = "e\u0301<think>cafe\u0301 and <think> caf\u00e9!"
    expected = theirs(text, return_offsets_mapping=True)
    for mine in mine_pair:
        mine.add_tokens(["<think>", "café"])
        got = mine(text, return_offsets_mapping=True)
        assert dict(got) == dict(expected)
        assert got.word_ids() == expected.word_ids()


MARKS = "\u0301\u0300\u0323\u0307\u0327\u0308\u031b\u0345\u05b0\u0f71\u0f72\u0f80\u302a\u3099\u309a\u0e38\u0c56"
STARTERS = "aeouAEOUıиαωxq \u1100\u1161\u11a8\u0915\u0b47\u0b3e\u0fb2\u0f80\u3046\u304b\u30cf\u00e9\u212b\u1e9b😀\n"


@given(st.text(alphabet=st.sampled_from(MARKS + STARTERS) | st.characters(blacklist_categories=("Cs",)), max_size=24))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_slow_offsets_on_random_text(both, hf, text):
    """The pure-Python alignment (NFC replayed as `tokenizers` aligns it) on text dense in combining marks,
    Hangul jamo and characters NFC composes, reorders or decomposes."""
    mine, theirs = both[0](text, return_offsets_mapping=True), hf(text, return_offsets_mapping=True)
    assert dict(mine) == dict(theirs)
    assert mine.word_ids() == theirs.word_ids()


def test_copies_and_pickles_keep_the_alignment(ours, hf):
    import copy
    import pickle

    texts = ["hello world", "e\u0301 <|im_end|>"]
    expected = [hf(texts, padding=True).word_ids(i) for i in range(2)]
    pending = ours(texts, padding=True)
    clone = copy.deepcopy(pending)  # shares the pending computation instead of copying the tokenizer
    assert [clone.word_ids(i) for i in range(2)] == expected
    assert [pending.word_ids(i) for i in range(2)] == expected
    restored = pickle.loads(pickle.dumps(pending))
    assert [restored.word_ids(i) for i in range(2)] == expected and restored["input_ids"] == pending["input_ids"]
    assert pickle.loads(pickle.dumps(ours(texts[1]))).word_ids() == expected[1]  # computed when pickled
    with pytest.raises(ValueError, match="needs the token alignment"):
        ours.pad({"input_ids": [[1, 2], [3]]}).word_ids()
