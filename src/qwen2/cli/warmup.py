"""The chat's quick start: answers are decoded eagerly at once, and switch to the compiled decode step (at
the next token) when it is ready.

The compiled step is a file in qwen2's cache (`cache_dir()/compile/`, qwen2.generation.precompiled), keyed
by the torch and Python versions, the CPU and its flags, the thread count and the model's config, dtypes,
quantisation, module types and int4 layouts (not its weights: the compiled graph takes them as inputs). A start that finds
it loads it in a background thread (seconds, no tracing). A start that does not compiles it in a child
process, stopped while an answer streams (`paused`) and niced: compiling in a thread of the chat's own
process took the cores and the interpreter lock from the answers (the first answer decoded at a fraction of
its speed), while a stopped process takes nothing and compiles while the user reads and types. Inductor's cache directory defaults to `cache_dir()/compile/inductor`
so that its compiled C++ kernels survive a reboot, as the file does.

Compiling here is `torch.compile`'s: on the CPU the step is ~1.5x faster than eager for a single row.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_FORMAT = "precompiled-decode-step-2"  # bump when what the file holds changes (2: 1-thread steps of GGUF loads)


def compile_dir() -> Path:
    from qwen2.loading.default_model import cache_dir

    return cache_dir() / "compile"


def keep_inductor_cache() -> None:
    """Point inductor's cache at qwen2's (unless the user chose one); before anything compiles."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_dir() / "inductor"))


def artifacts_key(model: Any) -> dict[str, Any]:
    """What the compiled decode step of `model` depends on (its file's name is a digest of it)."""
    import torch

    config = {k: v for k, v in model.config.to_dict().items() if k not in ("name_or_path", "_name_or_path")}
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return {
        "format": _FORMAT, "torch": torch.__version__, "python": sys.version.split()[0],
        "machine": platform.machine(), "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_flags": flags,
        "threads": torch.get_num_threads(), "config": config,
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "modules": sorted({type(m).__qualname__ for m in model.modules()}), "device": str(model.device),
        # int4's packed layout says which kernel the graph calls (torch's, or ours where it built)
        "layouts": sorted({m._layout for m in model.modules() if isinstance(getattr(m, "_layout", None), str)}),
    }


def artifacts_path(model: Any) -> Path:
    """Where the compiled decode step of `model` is kept."""
    text = json.dumps(artifacts_key(model), sort_keys=True, default=str)
    return compile_dir() / f"decode-step-{hashlib.sha256(text.encode()).hexdigest()[:24]}.bin"


class BackgroundCompile:
    """Readies a model's compiled decode step without holding up the chat; `ready` is set once answers use it.

    `options` are the command line's model options (`cli.options.MODEL_OPTIONS`): the child process loads
    the same model from them."""

    def __init__(self, model: Any, options: dict[str, Any]) -> None:
        from qwen2.generation import precompiled

        self.model, self.options = model, options
        self.step = precompiled.install(model)  # eager until the compiled function is set
        # Here, in the thread that decodes: torch's thread count is per thread, and the compiled step's guards
        # refuse calls at another count than the child compiled for.
        self._key = json.loads(json.dumps(artifacts_key(model), default=str))
        self.path = artifacts_path(model)
        self.ready = threading.Event()
        self.status = ("loading the saved compiled step" if self.path.is_file() else
                       "compiling in a background process (answers are eager meanwhile)")
        self._process: subprocess.Popen | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qwen2-compile", daemon=True)

    def start(self) -> BackgroundCompile:
        self._thread.start()
        return self

    def wait(self) -> None:
        """Until the compiled step is in use, or compiling failed (`--compile`: before the first prompt)."""
        self._thread.join()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within: a compiling process (and the compilers it runs) is stopped, leaving the cores to an answer.
        It holds no lock the answers wait for: the int8 kernels are built before it starts (`repl.run`)."""
        process = self._signal(signal.SIGSTOP)
        try:
            yield
        finally:
            if process is not None:
                self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> subprocess.Popen | None:
        process = self._process
        if process is None or process.poll() is not None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        return process

    def close(self) -> None:
        """Stop a compile still running (the next start compiles again)."""
        self._closed = True
        process = self._signal(signal.SIGKILL)
        if process is not None:
            process.wait()

    def _run(self) -> None:
        from qwen2.generation import precompiled

        path = self.path
        started = time.perf_counter()
        compiled_here = not path.is_file()
        if compiled_here and not self._compile(path):
            return
        try:
            self.step.function = precompiled.load(path)
        except Exception as err:  # noqa: BLE001 - a stale or broken file only costs eager answers
            self.status = f"eager: the compiled step in {path} could not be loaded ({type(err).__name__})"
            logger.warning("Could not load the compiled decode step %s (%s: %s); delete it to compile again",
                           path, type(err).__name__, err)
            return
        seconds = time.perf_counter() - started
        self.status = (f"compiled ({'built in a background process' if compiled_here else 'loaded from the cache'}"
                       f" in {seconds:.1f} s)")
        self.ready.set()
        logger.info("Decode step %s in %.1f s; answers use it from now on",
                    "compiled" if compiled_here else "loaded", seconds)

    def _compile(self, path: Path) -> bool:
        """Compile in a niced child process that writes `path`; whether it did."""
        log = path.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        spec = json.dumps({**self.options, "threads": self._key["threads"], "key": self._key})
        with open(log, "w", encoding="utf-8") as output:
            if self._closed:
                return False
            # A process group of its own: pausing stops the C++ compilers it runs too.
            self._process = subprocess.Popen([sys.executable, "-m", "qwen2.cli.precompile", spec, str(path)],
                                             stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            code = self._process.wait()
        if code != 0 or not path.is_file():
            self.status = f"eager: compiling failed (see {log})"
            if not self._closed:
                logger.warning("Compiling the decode step failed (see %s); answers stay eager", log)
            return False
        return True


def compile_in_child(argv: list[str]) -> int:
    """`python -m qwen2.cli.precompile SPEC PATH`: load the model SPEC names and save its compiled step."""
    import torch

    from qwen2.cli.options import load_weights
    from qwen2.generation import precompiled

    _die_with_parent()
    with contextlib.suppress(AttributeError, OSError):
        os.nice(10)  # the chat's answers come first (it is also stopped while they stream)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec, path = json.loads(argv[0]), Path(argv[1])
    torch.set_num_threads(spec.pop("threads"))  # inductor's kernels are built for a thread count
    keep_inductor_cache()
    wanted = spec.pop("key")
    model = load_weights(argparse.Namespace(**spec))
    have = json.loads(json.dumps(artifacts_key(model), default=str))
    for name, here, there in _differences(have, wanted):  # the chat's guards may then refuse the step
        logger.warning("This process's model differs from the chat's in %s: %s here, %s there", name, here, there)
    precompiled.save(model, path)
    return 0


def _differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{name}.")
        elif x != y:
            out.append((prefix + name, x, y))
    return out


def _die_with_parent() -> None:
    """Linux: be killed if the chat dies, even while stopped (a stopped orphan would keep its memory)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
