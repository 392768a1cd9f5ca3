"""Text generation. STUB: the generation helper replaces this with the real GenerationMixin and friends."""


class GenerationMixin:
    """Adds `generate()` to causal LMs."""
