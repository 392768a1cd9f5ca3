"""Qwen2Tokenizer (pure Python) and Qwen2TokenizerFast against transformers' Qwen2 tokenizer, loaded
from the same files: the real Qwen2.5 vocabulary written from the default GGUF."""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2.tokenizer import BatchEncoding, Qwen2Tokenizer, Qwen2TokenizerFast, TokenizerFileError, normalize
from qwen2.tokenizer.gguf import tokenizer_metadata_from_gguf
from tokenizer_corpus import corpus, unicode_tables, write_real_tokenizer_files

import transformers  # noqa: E402  (the oracle; a test dependency)


@pytest.fixture(scope="session")
def gguf_metadata(default_gguf) -> dict:
    return tokenizer_metadata_from_gguf(default_gguf)


@pytest.fixture(scope="session")
def tok_dir(gguf_metadata, tmp_path_factory) -> Path:
    return write_real_tokenizer_files(gguf_metadata, tmp_path_factory.getbasetemp() / "qwen2_tokenizer_files")


@pytest.fixture(scope="session")
def slow(tok_dir):
    return Qwen2Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def fast(tok_dir):
    return Qwen2TokenizerFast.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def hf(tok_dir):
    # In transformers 5 Qwen2TokenizerFast is an alias of Qwen2Tokenizer (one tokenizers-backed class),
    # so one instance is the reference for both names.
    assert transformers.Qwen2TokenizerFast is transformers.Qwen2Tokenizer
    return transformers.Qwen2Tokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="session")
def texts():
    return corpus()


@pytest.fixture(params=["slow", "fast"])
def ours(request, slow, fast):
    return slow if request.param == "slow" else fast


def _plain(value):
    if isinstance(value, (torch.Tensor, np.ndarray)):
        rows = [_plain(v) for v in value] if value.dtype == object else value.tolist()
        return type(value).__name__, str(value.dtype), tuple(value.shape), rows
    return value


def _same(a, b):
    assert set(a.keys()) == set(b.keys())
    for key in a.keys():
        assert _plain(a[key]) == _plain(b[key]), key


# ---- ids on the corpus ---------------------------------------------------------------------------
def test_corpus_is_varied(texts):
    assert len(texts) >= 2000
    joined = "".join(texts)
    for needle in ("中", "カ", "한", "ع", "न", "П", "\u200d", "\u0301", "\r\n", "<|im_end|>", "<tool_call>", "I'M"):
        assert needle in joined
    assert any(unicodedata.normalize("NFC", t) != t for t in texts)


def test_corpus_ids_match_transformers(ours, hf, texts):
    expected = [hf.encode(t) for t in texts]
    got = [ours.encode(t) for t in texts]
    bad = [t for t, e, g in zip(texts, expected, got) if e != g]
    assert not bad, f"{len(bad)} strings differ, first {bad[0][:80]!r}"
    # The batch path gives the same rows.
    assert ours(texts[:300])["input_ids"] == expected[:300]


def test_corpus_decode_matches_transformers(ours, hf, texts):
    for text in texts[::3]:
        ids = hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids) == reference_nfc(text)


def test_random_ids_decode_like_transformers(ours, hf):
    rng = random.Random(1)
    for _ in range(300):  # arbitrary id runs, including partial UTF-8 sequences
        ids = [rng.randrange(len(hf)) for _ in range(rng.randint(1, 12))]
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_tokenize_and_conversions(ours, hf):
    text = "Hello <|im_start|>wörld<tool_call> 123"
    assert ours.tokenize(text) == hf.tokenize(text)
    tokens = hf.tokenize(text) + ["definitely-not-a-token"]
    assert ours.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>") == 151645
    ids = hf.encode(text)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert ours.convert_tokens_to_string(hf.convert_ids_to_tokens(ids)) == hf.convert_tokens_to_string(hf.convert_ids_to_tokens(ids))


def reference_nfc(text: str) -> str:
    """NFC as the reference computes it: `tokenizers`' normaliser, whose data is Unicode 9.0 (for characters
    assigned since, it can differ from `unicodedata`)."""
    from tokenizers import normalizers

    return normalizers.NFC().normalize_str(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_roundtrip_is_nfc(slow, fast, text):
    nfc = reference_nfc(text)
    assert slow.decode(slow.encode(text)) == nfc
    assert fast.decode(fast.encode(text)) == nfc
    assert fast.encode(text) == slow.encode(text)
    if not any(0x80 <= ord(ch) and ord(ch) in normalize.NFC_INERT for ch in text):
        assert nfc == unicodedata.normalize("NFC", text)  # NFC proper, wherever the old data knows the text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40))
def test_arbitrary_unicode_matches_transformers(slow, hf, text):
    assert slow.encode(text) == hf.encode(text)


# Characters where newer Unicode data (unicodedata, the regex package) and tokenizers' older data differ:
# newly assigned letters and digits, marks unknown to Unicode 9.0 NFC, and plain old neighbours.
NEWER_UNICODE = [0x558, 0x1ABF, 0x1AC1, 0x82A, 0x1DF6, 0x0D3B, 0x11D42, 0x16FF0, 0x1E4D0, 0x2EBF0, 0x11F00,
                 0x1E290, 0x11935, 0x11930, 0x11938, 0x0301, 0x0316, 0x61, 0x20, 0x27, 0x73, 0x31, 0xA0, 0xE9]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(NEWER_UNICODE), min_size=1, max_size=12))
def test_newer_unicode_matches_transformers(slow, hf, code_points):
    text = "".join(map(chr, code_points))
    assert normalize.nfc(text) == reference_nfc(text)
    assert slow.encode(text) == hf.encode(text)


def test_unicode_tables_match_tokenizers():
    """The shipped classes are the installed `tokenizers`' own. Regenerate on a mismatch with
    `python tests/tokenizer_corpus.py --tables > src/qwen2/tokenizer/unicode_tables.py`."""
    from qwen2.tokenizer import unicode_tables as shipped

    def code_points(spans: str) -> set[int]:
        out = set()
        for span in spans.split(","):
            low, _, high = span.partition("-")
            out.update(range(int(low, 16), int(high or low, 16) + 1))
        return out

    fresh = unicode_tables()
    for name in ("LETTERS", "NUMBERS", "SPACES", "UNASSIGNED"):
        assert code_points(getattr(shipped, name)) == fresh[name], name
    # Characters this Python's unicodedata lacks are left alone by both sides, whatever the table says.
    known = {c for c in fresh["NFC_INERT"] | code_points(shipped.NFC_INERT) if unicodedata.category(chr(c)) != "Cn"}
    assert code_points(shipped.NFC_INERT) & known == fresh["NFC_INERT"] & known


# ---- special and added tokens --------------------------------------------------------------------
def test_special_tokens_and_properties(ours, hf):
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "unk_token_id", "all_special_tokens", "all_special_ids", "special_tokens_map",
                 "vocab_size", "model_max_length"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert len(ours) == len(hf)
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()
    }
    assert ours.added_tokens_decoder[151657].special is False  # <tool_call>: added, not special
    assert ours.get_vocab() == hf.get_vocab()


def test_split_special_tokens(ours, hf):
    text = "a<|im_end|>b<tool_call>c"
    assert ours.encode(text, split_special_tokens=True) == hf.encode(text, split_special_tokens=True)
    assert ours(text, split_special_tokens=True)["input_ids"] == hf(text, split_special_tokens=True)["input_ids"]


def test_add_tokens_like_transformers(ours, hf):
    mine, theirs = copy.deepcopy(ours), copy.deepcopy(hf)
    steps = [
        ("add_tokens", (["中文tok", "hello world", "<tool_call>", "héllo"],), {}),
        ("add_tokens", (["<new_special>"],), {"special_tokens": True}),
        ("add_special_tokens", ({"pad_token": "<pad>"},), {}),
        ("add_special_tokens", ({"additional_special_tokens": ["<x>", "<y>"]},), {}),
        ("add_special_tokens", ({"eos_token": "<|im_end|>"},), {}),
    ]
    for name, args, kwargs in steps:
        assert getattr(mine, name)(*args, **kwargs) == getattr(theirs, name)(*args, **kwargs), name
    text = "a中文tok b hello world<pad>c<x> héllo <new_special><tool_call>"
    assert mine.encode(text) == theirs.encode(text)
    ids = theirs.encode(text)
    assert mine.decode(ids) == theirs.decode(ids)
    assert mine.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    for name in ("pad_token", "pad_token_id", "all_special_tokens", "all_special_ids"):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert len(mine) == len(theirs)
    assert mine.get_added_vocab() == theirs.get_added_vocab()


# ---- the call surface ----------------------------------------------------------------------------
CALLS = [
    (["a b c", "d"], {}),
    (["a b c", "d"], {"padding": True}),
    (["a b c", "d"], {"padding": "longest", "padding_side": "left"}),
    (["a b c", "d"], {"padding": "max_length", "max_length": 6}),
    (["a b c", "d"], {"padding": "max_length", "max_length": 5, "pad_to_multiple_of": 4}),
    (["a b c d e f g h", "x"], {"padding": True, "truncation": True, "max_length": 4}),
    (["a b c d e f g h", "x"], {"max_length": 3}),
    ("a b c d e f", {"padding": True, "pad_to_multiple_of": 4, "return_length": True}),
    ("a b c d e f", {"return_tensors": "pt"}),
    (["a b c", "d"], {"padding": True, "return_tensors": "pt"}),
    (["a b c", "d"], {"padding": True, "return_tensors": "np", "return_attention_mask": False}),
    (["a b c", "d"], {"return_tensors": "np"}),
    ("a<|im_end|>b", {"return_special_tokens_mask": True, "return_token_type_ids": True}),
    (["a b c", "d"], {"padding": "max_length", "max_length": 5, "return_special_tokens_mask": True,
                      "padding_side": "left"}),
    (["a b", "c"], {"is_split_into_words": True}),
    ([["a", " b"], ["c"]], {"is_split_into_words": True, "padding": True}),
    ("", {}),
    ([""], {"padding": True, "return_tensors": "pt"}),
]


@pytest.mark.parametrize("text,kwargs", CALLS)
def test_call_matches_transformers(ours, hf, text, kwargs):
    _same(ours(text, **kwargs), hf(text, **kwargs))


PAIRS = [
    ("abc def ghi jkl", "mno pqr", {"truncation": True, "max_length": 5}),
    ("abc def ghi jkl mno pqr stu", "mno pqr", {"truncation": "longest_first", "max_length": 5}),
    ("abc def ghi", "mno pqr stu vwx", {"truncation": "only_second", "max_length": 5, "return_token_type_ids": True}),
    ("abc def ghi", "mno pqr stu vwx", {"truncation": "only_first", "max_length": 8}),
    (["abc def", "g"], ["h i j k", "l"], {"padding": True, "truncation": True, "max_length": 4}),
]


@pytest.mark.parametrize("text,pair,kwargs", PAIRS)
def test_pairs_match_transformers(ours, hf, text, pair, kwargs):
    _same(ours(text, pair, **kwargs), hf(text, pair, **kwargs))


def test_impossible_truncation_is_refused(ours, hf):
    for kwargs in ({"truncation": "only_first", "max_length": 6}, {"truncation": "only_second", "max_length": 2}):
        with pytest.raises(Exception, match="Truncation error"):
            hf("abc def ghi", "mno pqr stu vwx", **kwargs)
        with pytest.raises(ValueError, match="cannot reach max_length"):
            ours("abc def ghi", "mno pqr stu vwx", **kwargs)


def test_truncation_side_left(ours, hf):
    mine, theirs = copy.copy(ours), copy.copy(hf)
    mine.truncation_side = theirs.truncation_side = "left"
    args = (["a b c d e f g h i", "x"],)
    kwargs = {"padding": "max_length", "truncation": True, "max_length": 4}
    _same(mine(*args, **kwargs), theirs(*args, **kwargs))


def test_encode_and_batch_decode(ours, hf):
    assert ours.encode("a b c", return_tensors="pt").tolist() == hf.encode("a b c", return_tensors="pt").tolist()
    assert ours.encode("a b c d e", max_length=2) == hf.encode("a b c d e", max_length=2)
    batch = hf(["x <|im_end|> y", "z"], padding=True, return_tensors="pt")["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == hf.batch_decode(batch, skip_special_tokens=skip)
        assert ours.decode(batch, skip_special_tokens=skip) == hf.decode(batch, skip_special_tokens=skip)
    assert ours.decode(batch[0]) == hf.decode(batch[0])
    assert ours.decode(151645) == hf.decode(151645)


def test_pad_matches_transformers(ours, hf):
    cases = [
        ({"input_ids": [[1, 2, 3], [4]]}, {"return_tensors": "pt"}),
        ([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], {}),
        ([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], {"padding": "max_length", "max_length": 5, "padding_side": "left"}),
        ({"input_ids": [torch.tensor([1, 2]), torch.tensor([3])]}, {}),
    ]
    for inputs, kwargs in cases:
        _same(ours.pad(copy.deepcopy(inputs), **kwargs), hf.pad(copy.deepcopy(inputs), **kwargs))


def test_batch_encoding_access(ours):
    enc = ours(["hello world", "hi"], padding=True, return_tensors="pt")
    assert isinstance(enc, BatchEncoding)
    assert enc.input_ids is enc["input_ids"] and enc.input_ids.dtype == torch.int64
    assert enc[:1]["input_ids"].shape == (1, 2)
    assert enc.to("cpu") is enc and enc.attention_mask.device.type == "cpu"
    with pytest.raises(AttributeError):
        enc.no_such_field
    with pytest.raises(ValueError, match="padding=True"):
        ours(["hello world", "hi"], return_tensors="pt")


def test_padding_without_pad_token_is_refused(slow):
    mine = copy.copy(slow)
    mine._special_tokens = dict(slow._special_tokens, pad_token=None)
    with pytest.raises(ValueError, match="pad_token"):
        mine(["a", "b c"], padding=True)


# ---- saving and loading --------------------------------------------------------------------------
def test_save_and_reload_both_ways(ours, hf, texts, tmp_path):
    sample = texts[::40]
    ours.save_pretrained(tmp_path / "ours")
    theirs_from_ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    assert [theirs_from_ours.encode(t) for t in sample] == [hf.encode(t) for t in sample]
    assert theirs_from_ours.chat_template == hf.chat_template
    hf.save_pretrained(tmp_path / "theirs")
    for cls in (Qwen2Tokenizer, Qwen2TokenizerFast):
        reloaded = cls.from_pretrained(tmp_path / "theirs")  # transformers 5 writes tokenizer.json only
        assert [reloaded.encode(t) for t in sample] == [hf.encode(t) for t in sample]
        assert reloaded.chat_template == hf.chat_template
        assert reloaded.eos_token == hf.eos_token and len(reloaded) == len(hf)


def test_transformers_save_over_our_directory(slow, hf, texts, tmp_path):
    """transformers 5 re-saving a directory our save_pretrained (or `qwen2 convert`) wrote keeps vocab.json and
    merges.txt but rewrites tokenizer_config.json without added_tokens_decoder: the added tokens are then only in
    tokenizer.json, and the slow class must read them from there (it used to know 2 of the 22)."""
    slow.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(str(tmp_path)).save_pretrained(tmp_path)
    assert "added_tokens_decoder" not in json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "Write <tool_call> quicksort"}, {"role": "assistant", "content": "ok"}]
    sample = texts[::40] + ["<|im_start|>user\nhi<|im_end|>\n<|fim_prefix|>a<|fim_suffix|>"]
    for cls in (Qwen2Tokenizer, Qwen2TokenizerFast):
        reloaded = cls.from_pretrained(tmp_path)
        assert len(reloaded.added_tokens_decoder) == len(reference.added_tokens_decoder) == 22
        assert [reloaded.encode(t) for t in sample] == [reference.encode(t) for t in sample]
        assert reloaded.apply_chat_template(messages, return_dict=False) == \
            reference.apply_chat_template(messages, return_dict=False)
        assert reloaded.encode("<|im_start|>") == [151644]


def test_save_vocabulary_roundtrip(slow, tok_dir, tmp_path):
    paths = slow.save_vocabulary(tmp_path)
    assert [Path(p).name for p in paths] == ["vocab.json", "merges.txt"]
    assert json.loads(Path(paths[0]).read_text(encoding="utf-8")) == json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert Path(paths[1]).read_text(encoding="utf-8") == (tok_dir / "merges.txt").read_text(encoding="utf-8")


def test_fast_builds_without_tokenizer_json(tok_dir, slow, texts, tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    built = Qwen2TokenizerFast.from_pretrained(tmp_path)
    sample = texts[::20]
    assert [built.encode(t) for t in sample] == [slow.encode(t) for t in sample]


def test_slow_tokenizer_never_imports_tokenizers(tok_dir):
    code = (
        "import sys; from qwen2.tokenizer import Qwen2Tokenizer; "
        f"t = Qwen2Tokenizer.from_pretrained({str(tok_dir)!r}); "
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], return_dict=False); t.decode(ids); "
        "assert 'tokenizers' not in sys.modules, 'tokenizers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- bad input -----------------------------------------------------------------------------------
def test_missing_merges_is_a_clear_error(tok_dir, tmp_path):
    (tmp_path / "vocab.json").write_bytes((tok_dir / "vocab.json").read_bytes())
    for cls in (Qwen2Tokenizer, Qwen2TokenizerFast):
        with pytest.raises(TokenizerFileError, match="merges.txt"):
            cls.from_pretrained(tmp_path)


@pytest.mark.parametrize("content,message", [
    ('{"a": 0, "b": ', "not valid JSON"),
    ('["a", "b"]', "non-empty JSON object"),
    ('{"a": 0, "b": "1"}', "ids must be non-negative ints"),
    ('{"a": 0, "b": 0}', "id 0 is given to both"),
])
def test_malformed_vocab_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "vocab.json").write_text(content, encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    for cls in (Qwen2Tokenizer, Qwen2TokenizerFast):
        with pytest.raises(TokenizerFileError, match=message) as info:
            cls.from_pretrained(tmp_path)
        assert "vocab.json" in str(info.value)


def test_bad_merge_line_and_missing_files(tok_dir, tmp_path):
    (tmp_path / "vocab.json").write_bytes((tok_dir / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ Ġ\nthree parts here\n", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="line 3"):
        Qwen2Tokenizer.from_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerFileError, match="no tokenizer files"):
        Qwen2Tokenizer.from_pretrained(empty)


def test_out_of_range_ids_on_decode(ours):
    for bad in ([1, len(ours)], [-1], [10**9]):
        with pytest.raises(ValueError, match="out of range"):
            ours.decode(bad)


# ---- the GGUF conversion -------------------------------------------------------------------------
def test_gguf_metadata_and_config(default_gguf, gguf_metadata, tok_dir):
    from transformers.integrations.gguf import get_gguf_tokenizer  # the oracle's own reading of the file

    metadata = gguf_metadata
    _, reference, reference_config = get_gguf_tokenizer(str(default_gguf))
    assert metadata["tokenizer.ggml.model"] == reference["tokenizer_type"] == "gpt2"
    assert metadata["tokenizer.ggml.pre"] == reference["pre_tokenizer_type"] == "qwen2"
    for key in ("tokens", "token_type", "merges"):
        assert metadata[f"tokenizer.ggml.{key}"] == list(reference[key]), key
    for ours_key, ref_key in (("eos_token_id", "eos_token_id"), ("bos_token_id", "bos_token_id"),
                              ("padding_token_id", "pad_token_id")):
        assert metadata[f"tokenizer.ggml.{ours_key}"] == reference[ref_key], ours_key
    assert metadata["tokenizer.chat_template"] == reference_config["chat_template"]
    assert len(metadata["tokenizer.ggml.tokens"]) == 151936 and len(metadata["tokenizer.ggml.merges"]) == 151387
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    types = metadata["tokenizer.ggml.token_type"]
    for key, entry in config["added_tokens_decoder"].items():
        assert entry["special"] == (types[int(key)] == 3)
    assert config["added_tokens_decoder"]["151657"]["content"] == "<tool_call>"
    assert config["added_tokens_decoder"]["151657"]["special"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|endoftext|>", "<|im_end|>", "<|endoftext|>")
    assert config["model_max_length"] == 32768 and config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["clean_up_tokenization_spaces"] is False and config["split_special_tokens"] is False
    assert config["errors"] == "replace" and config["chat_template"] == metadata["tokenizer.chat_template"]


@pytest.mark.slow
def test_files_behave_like_transformers_gguf_load(hf_gguf_tokenizer, hf, fast, texts):
    """transformers' own GGUF tokenizer has no NFC normaliser (it is built as a GPT-2 tokenizer), while
    Qwen2 checkpoints and transformers' Qwen2Tokenizer normalise; so ids agree on NFC text."""
    nfc_texts = [t for t in texts if unicodedata.is_normalized("NFC", t)]
    assert len(nfc_texts) > 1000
    for text in nfc_texts:
        assert hf.encode(text) == hf_gguf_tokenizer.encode(text) == fast.encode(text)
    assert {i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in hf_gguf_tokenizer.added_tokens_decoder.items()
    }
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "all_special_tokens", "chat_template"):
        assert getattr(fast, name) == getattr(hf_gguf_tokenizer, name), name


@pytest.mark.slow
def test_from_pretrained_on_the_gguf(default_gguf, hf_gguf_tokenizer, texts):
    """Through qwen2.loading.hub.resolve_model_dir: a .gguf path, or a directory plus gguf_file."""
    sample = [t for t in texts[::25] if unicodedata.is_normalized("NFC", t)]
    for tokenizer in (Qwen2Tokenizer.from_pretrained(default_gguf),
                      Qwen2TokenizerFast.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)):
        assert [tokenizer.encode(t) for t in sample] == [hf_gguf_tokenizer.encode(t) for t in sample]
        assert tokenizer.chat_template == hf_gguf_tokenizer.chat_template


def test_small_vocabulary_without_every_byte(tmp_path):
    """Bytes the vocabulary cannot spell are dropped, as `tokenizers` does when there is no unk_token."""
    vocab = {c: i for i, c in enumerate("abcdefghĠ")}
    vocab.update({"ab": 9, "<|endoftext|>": 10})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    reference = transformers.Qwen2Tokenizer.from_pretrained(str(tmp_path))
    for cls in (Qwen2Tokenizer, Qwen2TokenizerFast):
        tokenizer = cls.from_pretrained(tmp_path)
        for text in ("ab cz xab!", "ééé", "<|endoftext|>ab", "zz ab éa"):
            assert tokenizer.encode(text) == reference.encode(text)
            mine, theirs = tokenizer(text, return_offsets_mapping=True), reference(text, return_offsets_mapping=True)
            assert dict(mine) == dict(theirs) and mine.word_ids() == theirs.word_ids()


@pytest.mark.parametrize("with_decoder", [True, False], ids=["added_tokens_decoder", "legacy_files_only"])
def test_transformers4_layout(tok_dir, tmp_path, with_decoder):
    """What older transformers saved: added_tokens.json, special_tokens_map.json, `extra_special_tokens: {}`;
    the side files count only when tokenizer_config.json has no added_tokens_decoder."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(additional_special_tokens=["<|im_start|>", "<|im_end|>"], extra_special_tokens={})
    config["added_tokens_decoder"]["151936"] = {"content": "<think>", "special": False, "normalized": False}
    if not with_decoder:
        del config["added_tokens_decoder"], config["eos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<think>": 151936, "<|im_end|>": 151645}), encoding="utf-8")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False}}), encoding="utf-8")
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "a<think>b<|im_end|>c<|im_start|>"
    for cls in (Qwen2Tokenizer, Qwen2TokenizerFast):
        tokenizer = cls.from_pretrained(tmp_path)
        assert tokenizer.encode(text) == reference.encode(text)
        assert tokenizer.decode(reference.encode(text), skip_special_tokens=True) == \
            reference.decode(reference.encode(text), skip_special_tokens=True)
        for attr in ("all_special_tokens", "eos_token", "extra_special_tokens"):
            assert getattr(tokenizer, attr) == getattr(reference, attr), attr
        assert len(tokenizer) == len(reference)


def test_named_extra_special_tokens(tok_dir):
    named = {"extra_special_tokens": {"image_token": "<|image_pad|>"}}
    reference = transformers.AutoTokenizer.from_pretrained(str(tok_dir), **named)
    for cls in (Qwen2Tokenizer, Qwen2TokenizerFast):
        tokenizer = cls.from_pretrained(tok_dir, **named)
        for attr in ("image_token", "image_token_id", "special_tokens_map", "all_special_tokens"):
            assert getattr(tokenizer, attr) == getattr(reference, attr), attr


@pytest.mark.parametrize("change,message", [
    ({"tokenizer.ggml.model": "llama"}, "only byte-level BPE"),
    ({"tokenizer.ggml.merges": []}, "no tokenizer.ggml.merges"),
    ({"tokenizer.ggml.token_type": [1, 3]}, "token_type has 2 entries"),
    ({"tokenizer.ggml.eos_token_id": 10**6}, "outside the vocabulary"),
])
def test_bad_gguf_tokenizer_metadata(gguf_metadata, tmp_path, change, message):
    from qwen2.tokenizer.gguf import write_tokenizer_files

    with pytest.raises(ValueError, match=message):
        write_tokenizer_files({**gguf_metadata, **change}, tmp_path)
