"""Training checkpoints, written atomically: everything goes to a temporary directory beside the final one,
is flushed to disk, and only then renamed to `checkpoint-STEP`; a run killed mid-write leaves a `.tmp`
directory that is ignored (and removed by the next save), never a half-written checkpoint.

A checkpoint holds what a resumed run needs to continue step for step as if never stopped: the trainable
weights (safetensors), the optimizer and scheduler states, every process' random generator states, and the
step (which fixes the data position: batches are a pure function of seed and step).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(PREFIX + r"(\d+)")


def rng_state() -> dict[str, Any]:
    """This process' random generator states (torch CPU and CUDA, Python's `random`)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(root: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict[str, Any],
                    scheduler: dict[str, Any], rng_states: list[dict[str, Any]], state: dict[str, Any],
                    keep: int | None = None) -> Path:
    """Write `root/checkpoint-STEP` atomically and return it; with `keep`, only the newest `keep` remain."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    final, temporary = root / f"{PREFIX}{step}", root / f".{PREFIX}{step}.tmp"
    temporary.mkdir()
    save_file({name: t.detach().contiguous().cpu() for name, t in weights.items()},
              str(temporary / "trainable.safetensors"))
    torch.save({"optimizer": optimizer, "scheduler": scheduler, "rng": rng_states}, temporary / "training.pt")
    (temporary / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
    _fsync_tree(temporary)
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
        shutil.rmtree(final)
    os.rename(temporary, final)
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return [path for _, path in sorted(found)]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """{'weights', 'optimizer', 'scheduler', 'rng', 'state'} of a checkpoint directory."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise OSError(f"{path} is not a training checkpoint (no {STATE_FILE}): give a checkpoint-STEP directory "
                      "or the output directory that holds them")
    training = torch.load(path / "training.pt", map_location="cpu", weights_only=True)
    return {"weights": load_file(str(path / "trainable.safetensors")), **training,
            "state": json.loads((path / STATE_FILE).read_text())}


def resolve_resume(resume: str | Path, output_dir: str | Path) -> Path:
    """`--resume` names a checkpoint directory, or an output directory (its newest checkpoint)."""
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path, Path(output_dir) / "checkpoints", path / "checkpoints"):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise OSError(f"no checkpoint to resume from in {path}")
