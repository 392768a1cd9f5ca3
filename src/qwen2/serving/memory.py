"""How many KV blocks a memory budget buys."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a budget the cache takes this share of the memory available when the engine starts, at most 2 GiB.
DEFAULT_FRACTION = 0.2
DEFAULT_CAP = 2 << 30


def available_memory(device: torch.device) -> int:
    """Free bytes on `device`: the accelerator's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_cache_blocks(budget: int | float | None, bytes_per_block: int, device: torch.device) -> int:
    """Blocks that fit in `budget`: bytes if an int, a fraction (0, 1] of available memory if a float."""
    if budget is None:
        size = min(int(available_memory(device) * DEFAULT_FRACTION), DEFAULT_CAP)
    elif isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"kv_cache_memory must be bytes (int) or a fraction (float), got {budget!r}.")
    elif isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {budget}.")
        size = int(available_memory(device) * budget)
    else:
        size = budget
    blocks = size // bytes_per_block
    if blocks < 1:
        raise ValueError(f"kv_cache_memory={budget!r} holds no KV block (one block is {bytes_per_block} bytes).")
    return blocks
