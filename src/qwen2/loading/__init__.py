"""Checkpoint loading: local directories, the hub, safetensors, GGUF and the embedded default model."""
