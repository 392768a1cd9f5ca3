"""A checkpoint is never left half-written: a save that dies midway leaves only an ignored temporary
directory, resuming takes the last complete checkpoint, and the next save clears the debris."""

from __future__ import annotations

import pytest
import torch

from qwen2.training import checkpoint


def _save(root, step, **extra):
    weights = {"w": torch.full((2, 2), float(step))}
    return checkpoint.save_checkpoint(root, step, weights, {"state": {}}, {"last_epoch": step},
                                      [checkpoint.rng_state()], {"history": [{"step": step}]}, **extra)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(checkpoint.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4)
    monkeypatch.undo()
    assert (tmp_path / ".checkpoint-4.tmp").is_dir() and not (tmp_path / "checkpoint-4").exists()
    assert checkpoint.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    latest = checkpoint.resolve_resume(tmp_path, tmp_path)
    saved = checkpoint.load_checkpoint(latest)
    assert saved["state"]["step"] == 2 and torch.equal(saved["weights"]["w"], torch.full((2, 2), 2.0))

    _save(tmp_path, 4, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_rng_states_round_trip_and_bad_resume_paths(tmp_path):
    torch.manual_seed(3)
    path = _save(tmp_path, 1)
    expected = torch.rand(3)
    torch.manual_seed(99)
    checkpoint.set_rng_state(checkpoint.load_checkpoint(path)["rng"][0])
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(OSError, match="no checkpoint to resume from"):
        checkpoint.resolve_resume(tmp_path / "elsewhere", tmp_path / "elsewhere")
    with pytest.raises(OSError, match="not a training checkpoint"):
        checkpoint.load_checkpoint(tmp_path)
