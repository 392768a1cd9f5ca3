"""`GenerationMixin.generate`: work in progress (the decode loop lands next)."""


class GenerationMixin:
    """Adds `generate()` to causal LMs."""
