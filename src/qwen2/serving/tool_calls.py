"""Qwen2.5's tool calls in OpenAI's shape.

Qwen2.5's chat template asks the model to answer a call as one block per call,
`<tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call>`, several blocks in one answer for several
calls. A block becomes an OpenAI tool call only when it is complete and its JSON is an object with a string `name`
and an object `arguments`; anything else (a block cut off by max_tokens, broken JSON) stays text, so no answer is
lost. Streaming holds a block back until it closes and then sends it as OpenAI does: one delta with the index, id,
type and name (arguments ""), then the arguments; text around the blocks streams as it comes, minus any tail that
could be the start of `<tool_call>`. Streaming and non-streaming parse the same text into the same calls.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object

    def to_openai(self, call_id: str) -> dict[str, Any]:
        return {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_block(body: str) -> ParsedCall | None:
    """The call a block's body (between the tags) holds, or None if it is not a valid call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some answers encode the object as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str, tool_names: frozenset[str] = frozenset()) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole answer: the text outside valid blocks (None if only whitespace remains around
    calls) and the calls in order."""
    parser = ToolCallStreamParser(tool_names)
    content = "".join(event for event in parser.feed(text) + parser.finish() if isinstance(event, str))
    if parser.calls and not content.strip():
        return None, parser.calls
    return content, parser.calls


def _partial_open_length(text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `<tool_call>`."""
    for length in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-length:]):
            return length
    return 0


@dataclass
class ToolCallStreamParser:
    """Turns an answer's text, fed piece by piece, into events: `str` for content, `ParsedCall` for a call.

    Small models (Qwen2.5-Coder-0.5B) often answer a call as the bare JSON object without the tags: an answer
    that is exactly one such object naming one of `tool_names` is a call too (such an answer is held back whole,
    as it could be either).

    Whitespace between a closing tag and the next block (the template's newline) is dropped, as it separates
    calls rather than being part of the answer; so is whitespace before the first call when nothing else precedes
    it (held back until the answer shows which), so a streamed answer reads as the whole one."""

    tool_names: frozenset[str] = frozenset()
    calls: list[ParsedCall] = field(default_factory=list)
    _bare: bool = False  # the answer opened with "{": held whole until it ends
    _pending: str = ""
    _in_block: bool = False
    _after_call: bool = False
    _held: str = ""  # leading whitespace, not yet known to be content
    _spoke: bool = False  # some content was emitted

    def _text(self, text: str) -> list[str | ParsedCall]:
        if not self._spoke and not self.calls and not text.strip():
            self._held += text
            return []
        text, self._held, self._spoke = self._held + text, "", True
        return [text]

    def feed(self, delta: str) -> list[str | ParsedCall]:
        self._pending += delta
        events: list[str | ParsedCall] = []
        if self.tool_names and not self._spoke and not self.calls and not self._in_block:
            self._bare = self._bare or (self._held + self._pending).lstrip().startswith("{")
        if self._bare:
            return events
        while True:
            if self._in_block:
                end = self._pending.find(CLOSE)
                if end < 0:
                    return events
                body, self._pending = self._pending[:end], self._pending[end + len(CLOSE):]
                self._in_block = False
                call = parse_block(body)
                if call is None:
                    events += self._text(OPEN + body + CLOSE)
                else:
                    self._held = ""
                    self.calls.append(call)
                    events.append(call)
                    self._after_call = True
                continue
            if self._after_call:
                self._pending = self._pending.lstrip()
                if not self._pending:
                    return events
                self._after_call = False
            start = self._pending.find(OPEN)
            if start >= 0:
                if start:
                    events += self._text(self._pending[:start])
                self._pending = self._pending[start + len(OPEN):]
                self._in_block = True
                continue
            keep = _partial_open_length(self._pending)
            if len(self._pending) > keep:
                events += self._text(self._pending[:len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
            return events

    def finish(self) -> list[str | ParsedCall]:
        """The held-back text at the end of the answer (an unclosed block stays text)."""
        rest = (OPEN if self._in_block else "") + self._pending
        self._pending, self._in_block = "", False
        if self._bare:
            self._bare, whole, self._held = False, self._held + rest, ""
            call = parse_block(whole)
            if call is not None and call.name in self.tool_names:
                self.calls.append(call)
                return [call]
            return [whole]
        if self.calls and not self._spoke and not rest.strip():
            return []
        rest, self._held = self._held + rest, ""
        return [rest] if rest else []
