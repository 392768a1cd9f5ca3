"""The serving engine: continuous batching over a paged, prefix-cached KV cache (no HTTP here)."""

from qwen2.serving.errors import ContextLengthExceededError, EngineDeadError, EngineError, QueueFullError
from qwen2.serving.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from qwen2.serving.params import SamplingParams, StructuredOutputsParams

__all__ = [
    "CompletionOutput", "ContextLengthExceededError", "EngineDeadError", "EngineError", "Logprob",
    "QueueFullError", "RequestMetrics", "RequestOutput", "SamplingParams", "StructuredOutputsParams",
]
