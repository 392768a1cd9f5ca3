"""Files a model directory names (shards in an index, a tokenizer's `tokenizer_file`) stay inside it.

A downloaded directory is untrusted input: an index naming `../../elsewhere/model.safetensors` or
`/etc/passwd` must not make a loader read files the user never pointed it at. The check is on the name
itself (relative, no `..` climbing out), not on resolved symlinks: a hub snapshot's files are symlinks
into the hub's blob store, which is where they are meant to lead.
"""

from __future__ import annotations

import os
from pathlib import Path


def inside(directory: Path, name: object, where: str, error: type[Exception] = OSError) -> Path:
    """`directory / name`, refused with `error` naming `where` when `name` is not a relative path inside it."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{where} must name a file inside {directory}, not {name!r}")
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == os.curdir or normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise error(f"{where} names {name!r}, which is outside the model directory {directory}; a model "
                    f"directory may only name files inside itself")
    return directory / normal
