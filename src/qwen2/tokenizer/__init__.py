"""Qwen2 tokenizers (pure-Python and `tokenizers`-backed) and chat templates."""
