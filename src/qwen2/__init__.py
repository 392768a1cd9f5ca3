"""qwen2: a from-scratch PyTorch implementation of the Qwen2 family with transformers' public API.

Names are imported lazily so that `import qwen2` stays cheap and `qwen2.config` works without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Qwen2Config": "qwen2.config",
    "AutoConfig": "qwen2.auto",
    "AutoModel": "qwen2.auto",
    "AutoModelForCausalLM": "qwen2.auto",
    "AutoModelForSequenceClassification": "qwen2.auto",
    "AutoModelForTokenClassification": "qwen2.auto",
    "AutoModelForQuestionAnswering": "qwen2.auto",
    "AutoTokenizer": "qwen2.auto",
    "Qwen2PreTrainedModel": "qwen2.model",
    "Qwen2Model": "qwen2.model",
    "Qwen2ForCausalLM": "qwen2.model",
    "Qwen2ForSequenceClassification": "qwen2.model",
    "Qwen2ForTokenClassification": "qwen2.model",
    "Qwen2ForQuestionAnswering": "qwen2.model",
    "DynamicCache": "qwen2.cache",
    "StaticCache": "qwen2.cache",
    "Qwen2Tokenizer": "qwen2.tokenizer",
    "Qwen2TokenizerFast": "qwen2.tokenizer",
    "BatchEncoding": "qwen2.tokenizer",
    "get_json_schema": "qwen2.tokenizer",
    "GenerationConfig": "qwen2.generation",
    "TextStreamer": "qwen2.generation",
    "TextIteratorStreamer": "qwen2.generation",
    "LLM": "qwen2.serving.llm",
    "SamplingParams": "qwen2.serving.params",
    "StructuredOutputsParams": "qwen2.serving.params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen2' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
