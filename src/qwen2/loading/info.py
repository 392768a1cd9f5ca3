"""`describe_model`: what `qwen2 info` prints, read from headers only (no weights are loaded)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any


def _config_summary(config: Any) -> dict[str, Any]:
    return {
        "architecture": "qwen2",
        "layers": config.num_hidden_layers,
        "hidden size": config.hidden_size,
        "intermediate size": config.intermediate_size,
        "attention heads": f"{config.num_attention_heads} (kv {config.num_key_value_heads}, head dim {config.head_dim})",
        "vocabulary": config.vocab_size,
        "context length": config.max_position_embeddings,
        "rope": config.rope_parameters,
        "tied embeddings": config.tie_word_embeddings,
    }


def _parameters(total: int, head: int | None) -> str:
    """The parameter count, explaining an output head stored apart from the embeddings (untied): a model
    published with tied embeddings (Qwen2.5-Coder-0.5B-Instruct: 0.49 B) counts the vocabulary twice then."""
    if not head:
        return f"{total:,}"
    return (f"{total:,} = {total - head:,} + {head:,} for the output head, which this file stores apart from the "
            f"input embeddings (untied) rather than sharing them")


def _counts(counter: Counter) -> str:
    return ", ".join(f"{count} {name}" for name, count in counter.most_common())


def _describe_gguf(path: Path) -> dict[str, Any]:
    from qwen2.loading.gguf import GGUFFile, gguf_config

    gf = GGUFFile(path)
    info = {"file": str(path), "format": f"GGUF v{gf.version}", "size": f"{path.stat().st_size:,} bytes"}
    name = gf.get("general.name")
    if name:
        info["name"] = name
    config = gguf_config(gf)
    info.update(_config_summary(config))
    head = gf.tensors.get("output.weight")
    untied = head is not None and not config.tie_word_embeddings
    info["parameters"] = _parameters(sum(math.prod(t.shape) for t in gf.tensors.values()),
                                     math.prod(head.shape) if untied else None)
    info["tensor types"] = _counts(Counter(t.ggml_type.name for t in gf.tensors.values()))
    return info


def _describe_directory(directory: Path) -> dict[str, Any]:
    from safetensors import safe_open

    from qwen2.config import Qwen2Config

    config = Qwen2Config.from_pretrained(directory)
    info = {"directory": str(directory), "format": "safetensors"}
    info.update(_config_summary(config))
    files = sorted(directory.glob("*.safetensors"))
    dtypes: Counter = Counter()
    parameters = head = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                dtypes[view.get_dtype()] += 1
                parameters += math.prod(view.get_shape())
                if key == "lm_head.weight" and not config.tie_word_embeddings:
                    head = math.prod(view.get_shape())
    info["size"] = f"{sum(f.stat().st_size for f in files):,} bytes in {len(files)} file(s)"
    info["parameters"] = _parameters(parameters, head)
    info["tensor dtypes"] = _counts(dtypes)
    quantization = json.loads((directory / "config.json").read_text()).get("quantization_config")
    info["quantization"] = quantization or "none"
    return info


def describe_model(source: str | os.PathLike, gguf_file: str | None = None) -> dict[str, Any]:
    """A flat, printable description of a model: a .gguf file, a directory, or a hub id."""
    path = Path(source)
    if gguf_file is not None:
        path = path / gguf_file
    if path.suffix == ".gguf" and path.is_file():
        return _describe_gguf(path)
    if not path.exists() and path.suffix == ".gguf":
        raise FileNotFoundError(f"No GGUF file at {path}")
    from qwen2.loading.hub import resolve_model_dir
    from qwen2.loading.safetensors import gguf_weights

    directory = resolve_model_dir(source)
    gguf = gguf_weights(directory)  # a GGUF's cache directory: its weights are the GGUF itself
    return _describe_gguf(gguf) if gguf is not None else _describe_directory(directory)
