"""Start the ranks of a tensor-parallel job on this machine, as `torchrun --nproc-per-node N` would: one
process per rank with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Used by
`qwen2 serve --tensor-parallel-size N`; multi-node jobs use torchrun itself (docs/scaling.md)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, threads: int | None = None) -> dict[str, str]:
    """The environment torchrun gives rank `rank`, on the loopback interface; `threads` sets each rank's
    OpenMP threads (N ranks on the cores one process would use, not N times as many)."""
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def launch(argv: list[str], world_size: int, threads: int | None = None) -> list[subprocess.Popen]:
    """Run `python argv...` once per rank; rank 0 inherits stdout/stderr, the others' output goes there too."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    port = free_port()
    return [subprocess.Popen([sys.executable, *argv], env=rank_env(rank, world_size, port, threads),
                             preexec_fn=_die_with_parent) for rank in range(world_size)]


def _die_with_parent() -> None:
    """In the child before exec: on Linux, SIGTERM when the launcher dies (even by SIGKILL), so no rank is
    left waiting for a peer that will never come."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait(processes: list[subprocess.Popen], timeout: float | None = None) -> int:
    """Wait for every rank; when one fails (or `timeout` passes) the rest are stopped. Returns the first
    non-zero exit code (or 0)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                logger.error("A rank exited with code %d; stopping the others.", failed[0])
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                logger.error("The ranks did not finish within %.0f s; stopping them.", timeout)
                return 124
            time.sleep(0.05)
    finally:
        stop(processes)


def stop(processes: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM each running rank, then SIGKILL what is left after `grace` seconds."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_job(argv: list[str], world_size: int, threads: int | None = None) -> int:
    """Launch the ranks and wait for them (the parent of `qwen2 serve --tensor-parallel-size N`). SIGTERM and
    Ctrl-C go to rank 0, which shuts down gracefully and releases the others; a rank that fails stops the
    job. Returns rank 0's exit code (or the failed rank's)."""
    processes = launch(argv, world_size, threads)

    def forward(signum: int, frame: object) -> None:
        if processes[0].poll() is None:
            processes[0].send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while processes[0].poll() is None:
            failed = [p.returncode for p in processes[1:] if p.poll() not in (None, 0)]
            if failed:
                logger.error("A tensor-parallel rank exited with code %d; stopping the job.", failed[0])
                return failed[0]
            time.sleep(0.1)
        return processes[0].returncode
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop(processes, grace=10.0)
