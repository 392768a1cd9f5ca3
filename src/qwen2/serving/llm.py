"""LLM: the offline batch API in vLLM's shape (`LLM(model).generate(prompts, SamplingParams(...))`)."""

from __future__ import annotations

from typing import Any

from qwen2.serving.outputs import RequestOutput
from qwen2.serving.params import SamplingParams


class LLM:
    def __init__(self, model: str = "Qwen/Qwen2.5-Coder-0.5B-Instruct", *, quantization: str | None = None,
                 dtype: Any = None, **engine_config: Any) -> None:
        raise NotImplementedError

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion through the engine; outputs come back in the prompts' order."""
        raise NotImplementedError

    def chat(self, messages_or_conversations: list, sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, tools: list[dict] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the chat template to one conversation (a list of messages) or many, then generate."""
        raise NotImplementedError
