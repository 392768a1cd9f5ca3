"""The chat's quick start: the decode step is compiled in a background thread while the first answers are
decoded eagerly, and the answers switch to the compiled step once it is ready.

What compiling produced is kept in qwen2's cache (`cache_dir()/compile/`) as PyTorch's portable compile
caches (`torch.compiler.save_cache_artifacts`: inductor's generated code and AOTAutograd's graphs), keyed by
the torch and Python versions, the CPU, the thread count and the model's config, dtypes and module types (not
its weights: the compiled graph takes them as inputs). A later start loads them before compiling, which
then skips code generation and the C++ builds; dynamo still traces the model (seconds), in the background.
generate() keeps the model as it is (qwen2.generation.fast), so the eager answers and the compiling thread
can share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def artifacts_path(model: Any) -> Path:
    """Where the compile caches of `model`'s decode step are kept."""
    import torch

    from qwen2.loading.default_model import cache_dir

    config = {k: v for k, v in model.config.to_dict().items() if k not in ("name_or_path", "_name_or_path")}
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    key = {
        "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_flags": flags, "threads": torch.get_num_threads(),
        "config": config, "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "modules": sorted({type(m).__qualname__ for m in model.modules()}), "device": str(model.device),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir() / "compile" / f"decode-step-{digest}.bin"


class BackgroundCompile:
    """Compiles a model's decode step in a daemon thread; `ready` tells the answers when to switch to it."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.ready = threading.Event()
        self.status = "compiling in the background (answers are decoded eagerly meanwhile)"
        self._thread = threading.Thread(target=self._run, name="qwen2-compile", daemon=True)

    def start(self) -> BackgroundCompile:
        self._thread.start()
        return self

    def _run(self) -> None:
        import torch

        from qwen2.cli.answer import compile_up_front
        from qwen2.generation.fast import compiled_step

        path = artifacts_path(self.model)
        reused = False
        if path.is_file():
            try:
                torch.compiler.load_cache_artifacts(path.read_bytes())
                reused = True
                logger.info("Loaded the decode step's compile caches from %s", path)
            except Exception as err:  # noqa: BLE001 - a stale or broken cache file only costs a full compile
                logger.warning("Ignoring the compile caches in %s (%s: %s)", path, type(err).__name__, err)
        started = time.perf_counter()
        try:
            compile_up_front(self.model)
        except Exception as err:  # noqa: BLE001 - the chat goes on eagerly whatever happened here
            self.status = f"eager: compiling failed ({type(err).__name__}: {err})"
            logger.warning("Compiling the decode step failed (%s: %s); answers stay eager", type(err).__name__, err)
            return
        step = compiled_step(self.model)
        if step is None or step.failed:
            self.status = "eager: compiling failed"
            return
        seconds = time.perf_counter() - started
        self.status = f"compiled in {seconds:.1f} s" + (" (from the cached artefacts)" if reused else "")
        self.ready.set()
        logger.info("Decode step compiled in the background in %.1f s; answers use it from now on", seconds)
        if not reused:
            self._save(path)

    @staticmethod
    def _save(path: Path) -> None:
        import torch

        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{threading.get_ident()}.partial")
        partial.write_bytes(artifacts[0])
        partial.replace(path)  # atomic: a concurrent start never reads half a file
        logger.info("Saved the decode step's compile caches (%d bytes) to %s", len(artifacts[0]), path)
