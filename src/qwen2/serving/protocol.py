"""OpenAI's request and response bodies as pydantic models, with the field names, defaults and limits clients
expect (OpenAI's API reference; vLLM's extras `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`,
`ignore_eos`). Validation here is about shape and ranges; checks that need the model (token ids in the vocabulary,
the context length) live in the handlers.

Numbers are validated strictly: a bool is not an int, a string is not a number (JSON clients that send `"0.7"`
get a 400 naming the field, not a silently coerced value). Unknown top-level fields are ignored, as OpenAI does for
fields a server does not know, so newer clients keep working; fields we know but cannot honour are refused.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidationInfo, field_validator, model_validator)

MAX_STOP_STRINGS = 16
MAX_N = 16
MAX_TOP_LOGPROBS = 20


def _number(value: Any) -> Any:
    """Ints and floats only (pydantic's lax float takes bools and numeric strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("Input should be a number")
    return value


Number = Annotated[float, BeforeValidator(_number)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Closed(BaseModel):
    """Nested objects whose every field we know: a misspelt key is an error, not silently dropped."""
    model_config = ConfigDict(extra="forbid")


# ---- messages --------------------------------------------------------------------------------------------------
class TextPart(_Closed):
    type: Literal["text"]
    text: StrictStr


Content = Union[StrictStr, list[TextPart]]


class FunctionCall(_Closed):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCall(_Closed):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Model):
    role: Literal["system", "developer"]
    content: Content
    name: StrictStr | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: Content
    name: StrictStr | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: Content | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> "AssistantMessage":
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Model):
    role: Literal["tool"]
    content: Content
    tool_call_id: StrictStr


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


def text_of(content: Content | None) -> str | None:
    """A message's content as one string (text parts joined), as the chat template expects."""
    if content is None or isinstance(content, str):
        return content
    return "".join(part.text for part in content)


# ---- tools -----------------------------------------------------------------------------------------------------
class FunctionDefinition(_Closed):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Closed):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(_Closed):
    type: Literal["function"]
    function: dict[str, StrictStr]


class StreamOptions(_Closed):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's name; accepted, usage then rides on every chunk


class JsonSchemaFormat(_Closed):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
    description: StrictStr | None = None
    json_schema: dict[str, Any] | StrictBool | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and allowed only with it")
        return self


class StructuredOutputs(_Model):
    """vLLM's `structured_outputs` extra: exactly one of these constrains the answer."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_: dict[str, Any] | StrictStr | StrictBool | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1)] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None


def _needs(name: str, other: str, message: str, unset: tuple[Any, ...] = (None,)) -> Any:
    """A validator refusing `name` set while `other` is falsy. It runs on the later field (pydantic validates
    fields in order, so `other` is known), and the error then names the field at fault."""

    def check(cls: type, value: Any, info: ValidationInfo) -> Any:
        if value not in unset and not info.data.get(other):
            raise ValueError(message)
        return value

    return field_validator(name)(classmethod(check))  # type: ignore[arg-type]


# ---- the shared sampling fields ---------------------------------------------------------------------------------
class _Sampling(_Model):
    model: StrictStr
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[Number, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0.0, le=10.0)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)] | None = None
    stop: StrictStr | Annotated[list[Annotated[StrictStr, Field(min_length=1)]],
                                Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    logit_bias: dict[str, Annotated[Number, Field(ge=-100.0, le=100.0)]] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    skip_special_tokens: StrictBool = True
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | StrictStr | StrictBool | None = None  # vLLM's older spellings
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1)] | None = None
    guided_grammar: StrictStr | None = None

    _stream_options_need_stream = _needs("stream_options", "stream",
                                         "stream_options is only allowed when stream is true")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None

    _top_logprobs_need_logprobs = _needs("top_logprobs", "logprobs", "top_logprobs requires logprobs to be true")
    _tool_choice_needs_tools = _needs("tool_choice", "tools", "tool_choice is only allowed when tools are given",
                                      unset=(None, "none"))

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Prompt = Union[
    StrictStr,
    Annotated[list[StrictStr], Field(min_length=1)],
    Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)],
    Annotated[list[Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]], Field(min_length=1)],
]


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: StrictBool = False
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16  # 0 with echo: score the prompt only
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    suffix: None = None  # fill-in-the-middle is not supported: any value is refused

    @field_validator("max_tokens")
    @classmethod
    def _zero_needs_echo(cls, value: Any, info: ValidationInfo) -> Any:
        if value == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens 0 is only allowed with echo")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value != info.data.get("n"):
            raise ValueError("best_of other than n is not supported")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: texts or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class TokenizeRequest(_Model):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Model):
    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


# ---- responses (plain dicts would do; models document the shape and keep the names in one place) --------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class _Choice(BaseModel):
    index: int
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatChoice(_Choice):
    message: ChatMessage


class CompletionChoice(_Choice):
    text: str


class _Answer(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage
    system_fingerprint: str | None = None


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "qwen2"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
