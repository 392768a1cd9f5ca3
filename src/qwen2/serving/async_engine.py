"""AsyncLLMEngine: the LLMEngine loop on its own thread, with asyncio iterators of each request's outputs.

The event loop never runs the model: requests and aborts cross to the engine thread through a queue and are
applied between steps; outputs come back through `loop.call_soon_threadsafe`. Adding a request waits (without
blocking the event loop) for the engine thread to accept it, so QueueFullError and
ContextLengthExceededError are raised by `generate()` before its first output.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from qwen2.serving.engine import EngineStats, LLMEngine
from qwen2.serving.errors import EngineDeadError
from qwen2.serving.outputs import RequestOutput
from qwen2.serving.params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._admitting = True
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qwen2-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       deadline: float | None = None, prompt: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield snapshots as the request advances, the last with finished=True. Raises QueueFullError,
        ContextLengthExceededError or ValueError (e.g. an invalid structured_outputs) before the first yield;
        stopping the iteration (client gone) aborts it."""
        self._check_alive()
        if not self._admitting:
            raise EngineDeadError("The engine is shutting down and accepts no new requests.")
        # a grammar compiles here, on a worker thread, so the engine's steps never wait for it
        constraint = await asyncio.to_thread(self.engine.compile_constraint, params) \
            if params.structured_outputs is not None else None
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        request = (request_id, list(prompt_token_ids), params, deadline, prompt, priority, constraint)
        self._send(("add", request, (loop, outputs), accepted))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:  # gone while the add is under way: commands run in order, this undoes it
            self._send(("abort", request_id))
            raise
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._send(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request (its blocks are freed between two steps); unknown ids are ignored."""
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop admitting requests, let running ones finish for up to `grace_seconds`, abort the rest, and
        stop the thread."""
        self._admitting = False
        end = time.monotonic() + grace_seconds
        while self._thread.is_alive() and (self._streams or not self._commands.empty()) \
                and time.monotonic() < end:
            await asyncio.sleep(0.02)
        self._send(("stop",))
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ the engine thread
    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _check_alive(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"The engine loop has stopped ({self._error!r}).")

    def _run(self) -> None:
        try:
            while not self._stop:
                self._apply_commands()
                if self._stop:
                    break
                if not self.engine.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                for output in self.engine.step():
                    self._deliver(output)
        except BaseException as err:  # noqa: BLE001 - every waiting caller must learn the loop died
            logger.exception("The engine loop died.")
            self._error = err
        finally:
            self._close_streams()

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind = command[0]
            if kind == "add":
                _, (request_id, ids, params, deadline, prompt, priority, constraint), stream, accepted = command
                if not accepted.set_running_or_notify_cancel():  # the caller gave up before the add came through
                    continue
                try:
                    self.engine.add_request(request_id, ids, params, deadline=deadline, prompt=prompt,
                                            priority=priority, constraint=constraint)
                except Exception as err:  # noqa: BLE001 - handed to the caller, raised there
                    accepted.set_exception(err)
                else:
                    self._streams[request_id] = stream
                    accepted.set_result(None)
            elif kind == "abort":
                self.engine.abort_request(command[1])
                self._streams.pop(command[1], None)
            elif kind == "stop":
                for request_id in list(self._streams):
                    self.engine.abort_request(request_id)
                for output in self.engine.step():
                    self._deliver(output)
                self._stop = True

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            del self._streams[output.request_id]
        _put(stream, output)

    def _close_streams(self) -> None:
        error = EngineDeadError(f"The engine loop has stopped ({self._error!r}).")
        for stream in self._streams.values():
            _put(stream, error)
        self._streams.clear()
        while True:  # requests sent after the loop ended
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                command[3].set_exception(error)


def _put(stream: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item: Any) -> None:
    loop, outputs = stream
    try:
        loop.call_soon_threadsafe(outputs.put_nowait, item)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening
        pass
