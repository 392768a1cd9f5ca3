"""Text generation with transformers' `generate()` API: greedy, sampling, beam search, stop strings, streaming."""

from qwen2.generation.config import GenerationConfig
from qwen2.generation.generate import GenerationMixin
from qwen2.generation.streamers import BaseStreamer, TextIteratorStreamer, TextStreamer

__all__ = ["BaseStreamer", "GenerationConfig", "GenerationMixin", "TextIteratorStreamer", "TextStreamer"]
