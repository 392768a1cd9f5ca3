"""Chat templates: a checkpoint's Jinja template rendered in jinja2's immutable sandbox.

Templates ship with checkpoints, so they are untrusted code: they run in
`ImmutableSandboxedEnvironment` (no dunder access, no mutation of inputs, no loader so no file
access) and only ever see plain JSON data. The helpers are the ones transformers gives templates
(reference: transformers' `utils/chat_template_utils.py`): `tojson` without HTML escaping,
`raise_exception`, `strftime_now`, a `dict` constructor, a `namespace` that refuses underscore names,
loop controls, and a `{% generation %}` block that renders its body.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

from qwen2.tokenizer.template_limits import bounded_environment, compile_source, render_bounded

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# While a render is tracked: (the chunks output so far, the spans of generation blocks found).
_GENERATION_TRACKING: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
    "qwen2_generation_tracking", default=None
)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_NO_TEMPLATE = (
    "Cannot use chat template functions because tokenizer.chat_template is not set and no template argument "
    "was passed: set tokenizer.chat_template to a Jinja template, or pass chat_template=..."
)


def select_template(own: str | dict[str, str] | None, requested: str | None, tools: list[Any] | None) -> str:
    """The template to render: the argument (or a named one), else the tokenizer's own."""
    if isinstance(own, dict):
        if requested is not None and requested in own:
            return own[requested]
        if requested is None:
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise ValueError(
                f"This tokenizer has several chat templates and no default: pass chat_template= one of {sorted(own)}"
            )
    if requested is not None:
        return requested
    if own is None:
        raise ValueError(_NO_TEMPLATE)
    return own


@lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """Compile once per distinct template source."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise ImportError("apply_chat_template needs jinja2>=3.1.6: pip install jinja2") from exc
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need >= 3.1.6")

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text: rendered as is, and, while a render
        is tracked, its character span in the output is recorded (for `return_assistant_tokens_mask`)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            text = caller()
            tracking = _GENERATION_TRACKING.get()
            if tracking is not None:
                # Everything the template output before this block has been consumed already.
                emitted, spans = tracking
                start = sum(map(len, emitted))
                spans.append((start, start + len(text)))
            return text

    class Namespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing underscore names so templates cannot shadow internals."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed names on a namespace: {name!r}"
                )

    class SafeDict:
        """`dict(...)` for templates, without exposing the dict type itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = bounded_environment(
        ImmutableSandboxedEnvironment, trim_blocks=True, lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=SafeDict(), namespace=Namespace)
    return compile_source(env, source)


def plain_data(value: Any) -> Any:
    """Rebuild inputs from JSON types only; anything else becomes an inert "<TypeName>" placeholder,
    so a template never holds an object whose methods the sandbox does not know to be dangerous."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return plain_data(value.item())  # numpy / torch scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _messages(conversation: Any) -> list[dict[str, Any]]:
    """Messages as dicts (dataclasses and pydantic models accepted), without keys whose value is None."""
    messages = plain_data(getattr(conversation, "messages", conversation))
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"a conversation must be a list of messages, got {type(conversation).__name__}")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _tool_schemas(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    import inspect

    from qwen2.tokenizer.tool_schema import get_json_schema

    schemas = []
    for tool in tools:
        if isinstance(tool, dict):
            schemas.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            schemas.append(get_json_schema(tool))
        else:
            raise ValueError(
                f"tools must be JSON schemas (dicts) or Python functions with type hints and a Google-style "
                f"docstring; got {type(tool).__name__}"
            )
    return plain_data(schemas)


def _mark_final_message(chat: list[dict[str, Any]], field: str, template: str) -> str:
    """Tag the text to continue, so the rendering can be cut right after it."""
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
    fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final] if field in _REASONING_FIELDS else [field]
    if not any(f in template for f in fields):
        raise ValueError(f'continue_final_message is set to "{field}" but the chat template never reads that field')
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if isinstance(block, dict) and "text" in block:
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text block to continue")
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final


def _cut_after_final(rendered: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError(
            "continue_final_message is set but the final message does not appear in the rendered chat: the "
            f"template drops or rewrites it. Final message: {final.strip()!r}"
        )
    at = rendered.rindex(tag)
    if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed trailing whitespace after the tag


def render_conversations(
    template: str,
    conversations: list[Any],
    tools: list[Any] | None = None,
    documents: list[dict[str, str]] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    generation_spans: list[list[tuple[int, int]]] | None = None,
    **kwargs: Any,
) -> list[str]:
    """Render each conversation; extra keyword arguments become template variables. Given a
    `generation_spans` list, the character spans of each rendering's `{% generation %}` blocks are
    appended to it."""
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt are not compatible: use continue_final_message to "
            "let the model continue the last message, add_generation_prompt to open a new assistant turn"
        )
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    compiled = compile_template(template)
    schemas, documents, kwargs = _tool_schemas(tools), plain_data(documents), plain_data(kwargs)
    field = continue_final_message if isinstance(continue_final_message, str) else "content"
    rendered = []
    for conversation in conversations:
        chat = _messages(conversation)
        final = None
        if continue_final_message:
            if not chat:
                raise ValueError("continue_final_message is set but the conversation is empty!")
            final = _mark_final_message(chat, field, template)
        variables = dict(messages=chat, tools=schemas, documents=documents,
                         add_generation_prompt=add_generation_prompt, **kwargs)
        if generation_spans is None:
            text = render_bounded(compiled, **variables)
        else:
            emitted: list[str] = []
            spans: list[tuple[int, int]] = []
            token = _GENERATION_TRACKING.set((emitted, spans))
            try:
                text = render_bounded(compiled, emitted, **variables)
            finally:
                _GENERATION_TRACKING.reset(token)
            generation_spans.append(spans)
        rendered.append(_cut_after_final(text, final) if final is not None else text)
    return rendered


def assistant_masks(offsets: list[list[tuple[int, int]]], spans: list[list[tuple[int, int]]]) -> list[list[int]]:
    """1 for each token whose characters overlap a `{% generation %}` span (so a span cut by truncation keeps
    its remaining tokens), 0 elsewhere and for padding."""
    masks = []
    for row_offsets, row_spans in zip(offsets, spans):
        mask = [0] * len(row_offsets)
        at = 0  # spans and tokens are both in text order: one pass
        for index, (start, end) in enumerate(row_offsets):
            while at < len(row_spans) and start >= row_spans[at][1]:
                at += 1
            if at == len(row_spans):
                break
            if end > row_spans[at][0]:
                mask[index] = 1
        masks.append(mask)
    return masks


# ---- sanitize_control_tokens: control tokens in user input are encoded as plain text ----------------
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"  # private-use markers around user-supplied control tokens


def template_literal_text(template: str) -> str:
    """The template's literal text and string constants, joined so no match can span two of them."""
    import jinja2.nodes

    ast = compile_template(template).environment.parse(template)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(sorted(literals))


def control_tokens(template: str, added: dict[int, Any], explicit: list[str] | None) -> tuple[str, ...]:
    """Special tokens, plus the added tokens the template itself writes (or the explicit list)."""
    if explicit is not None:
        wanted = set(explicit)
        return tuple(t.content for t in added.values() if t.special or t.content in wanted)
    text = template_literal_text(template)
    return tuple(t.content for t in added.values()
                 if t.special or (t.content in text and not t.content.isspace()))


def _alternation(tokens: tuple[str, ...]) -> str:
    import re

    return "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)"


def mark_control_tokens(value: Any, tokens: tuple[str, ...]) -> Any:
    """Wrap control tokens in user strings with markers (dropping any markers already there, so they
    cannot be forged); dict keys are left alone."""
    import re

    pattern = re.compile(_alternation(tokens))

    def mark(obj: Any) -> Any:
        if isinstance(obj, str):
            obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
            return pattern.sub(lambda m: f"{_MARK_START}{m.group(0)}{_MARK_END}", obj)
        if isinstance(obj, dict):
            return {key: mark(item) for key, item in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [mark(item) for item in obj]
        return obj

    return mark(value)


def encode_marked_chat(tokenizer: Any, chat: str) -> list[int]:
    """Ids of a chat rendered from marked inputs: marked tokens as plain text, the rest as usual.
    A lone marker (the template split a marked token) is dropped but still separates the text."""
    import re

    markers = re.compile(
        f"{_MARK_START}({_alternation(tuple(tokenizer.added_tokens_encoder))}){_MARK_END}|[{_MARK_START}{_MARK_END}]"
    )
    pieces = markers.split(chat)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    ids = tokenizer.encode(pieces[0], add_special_tokens=False)
    for index, piece in enumerate(pieces[1:], start=1):
        if not piece:
            continue
        as_text = index % 2 == 1
        encode = tokenizer._encode_plain if as_text else tokenizer.encode
        piece_ids = encode("\n" + piece)  # mid-chat context, then the newline is taken off again
        piece_ids = piece_ids[len(newline):] if piece_ids[:len(newline)] == newline else encode(piece)
        if as_text and tokenizer.convert_tokens_to_ids(piece) in piece_ids:
            raise ValueError(f"Can't sanitize {piece!r}: the tokenizer produces it from plain text")
        ids += piece_ids
    return ids
