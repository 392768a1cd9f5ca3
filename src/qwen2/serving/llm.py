"""LLM: the offline batch API in vLLM's shape (`LLM(model).generate(prompts, SamplingParams(...))`)."""

from __future__ import annotations

import itertools
from typing import Any

from qwen2.serving.engine import LLMEngine
from qwen2.serving.outputs import RequestOutput
from qwen2.serving.params import SamplingParams


class LLM:
    """Load a model once and run batches of prompts to completion through the serving engine."""

    def __init__(self, model: str = "Qwen/Qwen2.5-Coder-0.5B-Instruct", *, quantization: str | None = None,
                 dtype: Any = None, **engine_config: Any) -> None:
        self.engine = LLMEngine.from_pretrained(model, quantization=quantization, dtype=dtype, **engine_config)
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """An LLM over an engine built elsewhere (a model already in memory)."""
        llm = cls.__new__(cls)
        llm.engine = engine
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt (texts, or token id lists) to completion; outputs come back in the prompts' order.
        One SamplingParams serves every prompt, or give one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"Got {len(params)} SamplingParams for {len(prompts)} prompts.")
        ids = []
        for prompt, p in zip(prompts, params):
            request_id = str(next(self._ids))
            if isinstance(prompt, str):
                if self.engine.tokenizer is None:
                    raise ValueError("Text prompts need a tokenizer; give token id lists instead.")
                token_ids, text = self.engine.tokenizer.encode(prompt), prompt
            else:
                token_ids, text = list(prompt), None
            self.engine.check_request(token_ids, p)
            ids.append((request_id, token_ids, p, text))
        return self._run(ids, use_tqdm)

    def chat(self, messages_or_conversations: list, sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, tools: list[dict] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the chat template to one conversation (a list of messages) or many, then generate."""
        conversations = messages_or_conversations
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        tokenizer = self.engine.tokenizer
        prompts = [tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
                   for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, requests: list[tuple], use_tqdm: bool) -> list[RequestOutput]:
        # Requests are queued a few at a time so max_waiting never refuses an offline batch.
        order = {request_id: i for i, (request_id, *_rest) in enumerate(requests)}
        results: list[RequestOutput | None] = [None] * len(requests)
        pending = list(reversed(requests))
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="Processed prompts", unit="req")
        engine = self.engine
        try:
            while pending or engine.has_unfinished_requests():
                while pending and engine.num_waiting_requests() < max(1, engine.config.max_waiting):
                    request_id, token_ids, params, text = pending.pop()
                    engine.add_request(request_id, token_ids, params, prompt=text)
                for output in engine.step():
                    if output.finished and output.request_id in order:
                        results[order[output.request_id]] = output
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in order:
                engine.abort_request(request_id)
            engine.step()
            raise
        finally:
            if bar is not None:
                bar.close()
        return results
