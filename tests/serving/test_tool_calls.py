"""Qwen2.5 tool-call parsing: the blocks the real chat template writes parse back into the same calls, streaming
(fed in any pieces) gives what parsing the whole answer gives, and text that is not a valid call stays text."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qwen2.serving.tool_calls import ParsedCall, ToolCallStreamParser, parse_tool_calls
from tokenizer_corpus import write_real_tokenizer_files

CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 1, "b": [2, 3.5], "note": "é \"q\""})]


@pytest.fixture(scope="module")
def tokenizer(default_gguf, tmp_path_factory):
    from qwen2 import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        write_real_tokenizer_files(default_gguf, tmp_path_factory.getbasetemp() / "qwen2_tokenizer_files"))


def _assistant_turn(tokenizer, content: str, calls: list[tuple[str, dict]]) -> str:
    """The text the real Qwen2.5 template writes for an assistant turn with these calls (what the model learnt)."""
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": content,
                 "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    turn = rendered.rsplit("<|im_start|>assistant\n", 1)[1]
    return turn.removesuffix("\n").removesuffix("<|im_end|>")


def _stream(text: str, cuts: list[int]) -> tuple[str, list[ParsedCall]]:
    parser = ToolCallStreamParser()
    events = []
    bounds = [0] + sorted(set(c for c in cuts if 0 < c < len(text))) + [len(text)]
    for start, end in zip(bounds, bounds[1:]):
        events += parser.feed(text[start:end])
    events += parser.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ParsedCall)]


@pytest.mark.parametrize("content", ["", "Let me look that up."])
def test_template_written_calls_parse_back(tokenizer, content):
    text = _assistant_turn(tokenizer, content, CALLS)
    assert "<tool_call>" in text
    parsed_content, calls = parse_tool_calls(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == CALLS
    assert (parsed_content or "").strip() == content
    for size in (1, 3, 7):
        streamed_content, streamed_calls = _stream(text, list(range(size, len(text), size)))
        assert streamed_calls == calls
        assert streamed_content.strip() == content


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<tool_call>", "</tool_call>", '{"name": "f", "arguments": {"x": 1}}', "<tool",
                                 "_call>", "\n", " ", "hi", "<", '{"name": 3}', "{", "}", "é"]), max_size=12),
       st.lists(st.integers(0, 200), max_size=10))
@example([" ", "\n", "<tool_call>", '{"name": "f", "arguments": {"x": 1}}', "</tool_call>", " "], [1, 2])
@example(["<tool_call>", "hi", "</tool_call>", "<tool_call>", '{"name": "f", "arguments": {"x": 1}}', "</tool_call>"],
         [3, 12])
def test_streaming_equals_whole_parse(pieces, cuts):
    text = "".join(pieces)
    content, calls = parse_tool_calls(text)
    streamed_content, streamed_calls = _stream(text, cuts)
    assert streamed_calls == calls
    assert streamed_content == (content or "")
    if not calls:  # nothing is lost: text without a valid call comes back unchanged
        assert content == text


@pytest.mark.parametrize("text", [
    "<tool_call>\nnot json\n</tool_call>",
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
    '<tool_call>\n{"arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}',  # cut off by max_tokens: never closed
    "I would call <tool_call but did not",
])
def test_invalid_blocks_stay_text(text):
    assert parse_tool_calls(text) == (text, [])


def test_arguments_given_as_a_json_string_are_an_object():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>')
    assert content is None and calls == [ParsedCall("f", '{"x": 1}')]


def test_a_bare_json_answer_naming_a_tool_is_a_call():
    names = frozenset({"get_weather"})
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parse_tool_calls(bare, names) == (None, [ParsedCall("get_weather", '{"city": "Paris"}')])
    assert parse_tool_calls(bare) == (bare, [])  # no tools offered: text
    other = '{"name": "rm_rf", "arguments": {}}'
    assert parse_tool_calls(other, names) == (other, [])  # not an offered tool: text
    for text in (bare, other, '{"a": 1} and more', "plain"):
        parser = ToolCallStreamParser(names)
        events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
        content, calls = parse_tool_calls(text, names)
        assert [e for e in events if isinstance(e, ParsedCall)] == calls
        assert "".join(e for e in events if isinstance(e, str)) == (content or "")
