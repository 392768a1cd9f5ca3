"""Weight-only quantisation (int8, int4)."""
