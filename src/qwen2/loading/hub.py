"""Turn whatever the user passed (directory, .gguf file, hub id) into a local transformers-layout directory.

Every loader (config, model, tokenizer) goes through `resolve_model_dir`, so they all agree on what a name
means: a local directory is used as is, a GGUF is converted once into a cached directory, and anything else
is a Hugging Face Hub id fetched through `huggingface_hub` (its cache, `HF_HUB_OFFLINE` and
`local_files_only` respected). When the hub cannot serve the embedded default model's id, the embedded
GGUF stands in for it, with the hub model's generation defaults (`default_model.default_model_dir`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


class ModelNotFoundError(OSError):
    """A model name could not be resolved to files; the message says how to point at a local copy."""


def resolve_model_dir(name_or_path: str | os.PathLike, *, gguf_file: str | None = None, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                      token: str | bool | None = None, allow_patterns: Sequence[str] | None = None) -> Path:
    """A local directory holding config.json, weights and tokenizer files for `name_or_path`.

    `allow_patterns` restricts what a hub download fetches (e.g. only the tokenizer files); it does not
    apply to local directories or GGUF files.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _gguf_dir(path)
        raise ModelNotFoundError(f"{path} is a file, not a model directory: pass the directory that holds "
                                 f"config.json and the weights, or a .gguf file")
    if path.is_dir():
        if gguf_file is None:
            return path
        gguf_path = path / gguf_file
        if not gguf_path.is_file():
            raise ModelNotFoundError(f"gguf_file={gguf_file!r} does not exist in {path}")
        return _gguf_dir(gguf_path)
    if path.exists():  # a device, socket or pipe (`--model /dev/null`)
        raise ModelNotFoundError(f"{path} is neither a directory nor a regular file: pass a model directory or a "
                                 f".gguf file")
    if _looks_like_local_path(str(name_or_path)):
        raise ModelNotFoundError(f"{name_or_path} does not exist: pass an existing model directory, a .gguf file "
                                 f"or a Hugging Face Hub id like 'Qwen/Qwen2.5-0.5B-Instruct'")
    return _from_hub(str(name_or_path), gguf_file=gguf_file, revision=revision, cache_dir=cache_dir,
                     local_files_only=local_files_only, token=token, allow_patterns=allow_patterns)


def _from_hub(repo_id: str, *, gguf_file: str | None, revision: str | None, cache_dir: str | os.PathLike | None,
              local_files_only: bool, token: str | bool | None, allow_patterns: Sequence[str] | None) -> Path:
    from qwen2.loading.default_model import DEFAULT_MODEL_ID, is_default_model_id

    if is_default_model_id(repo_id) and repo_id.strip().lower() != DEFAULT_MODEL_ID.lower():
        return _default_model_dir()  # a local alias ("default"): nothing to ask the hub
    try:
        import huggingface_hub
    except ImportError as err:
        raise ModelNotFoundError(f"Loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub "
                                 f"(pip install huggingface_hub), or pass a local model directory") from err
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a later setting is honoured too.
    local_files_only = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    options = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    try:
        if gguf_file is not None:
            return _gguf_dir(Path(huggingface_hub.hf_hub_download(repo_id, gguf_file, **options)))
        return Path(huggingface_hub.snapshot_download(
            repo_id, allow_patterns=list(allow_patterns) if allow_patterns else None, **options))
    except (OSError, ValueError) as err:  # offline, not cached, no such repo, invalid id, HTTP errors
        if is_default_model_id(repo_id) and gguf_file is None:
            logger.info("The hub cannot serve %s (%s); using the embedded default model instead", repo_id, err)
            return _default_model_dir()
        offline = local_files_only or huggingface_hub.constants.HF_HUB_OFFLINE
        reason = ("it is not in the local Hugging Face cache and downloads are disabled (HF_HUB_OFFLINE / "
                  "local_files_only)") if offline else str(err)
        raise ModelNotFoundError(
            f"Could not load model {repo_id!r} from the Hugging Face Hub: {reason}. To use a local copy, pass the "
            f"path of a directory holding config.json and the weights (for example one made with "
            f"`hf download {repo_id} --local-dir DIR` on a machine with network access), or the path of a "
            f".gguf file.") from err


def _default_model_dir() -> Path:
    from qwen2.loading.default_model import default_model_dir

    return default_model_dir()


def _gguf_dir(gguf_path: Path) -> Path:
    try:
        from qwen2.loading.gguf import gguf_to_directory
    except ImportError as err:
        raise ModelNotFoundError(f"Cannot read {gguf_path}: GGUF support (qwen2.loading.gguf) is unavailable "
                                 f"({err})") from err
    return Path(gguf_to_directory(gguf_path))


def _looks_like_local_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else (absolute, ./, ~, deeper paths) is meant as a path."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or name.lower().endswith(".gguf"))
