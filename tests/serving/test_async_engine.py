"""AsyncLLMEngine: concurrent asyncio callers get the same tokens as the synchronous engine, errors surface
before the first output, a consumer that stops iterating aborts its request, shutdown drains."""

from __future__ import annotations

import asyncio

import pytest

from qwen2 import SamplingParams
from qwen2.serving.async_engine import AsyncLLMEngine
from qwen2.serving.errors import ContextLengthExceededError, EngineDeadError, QueueFullError

from engine_harness import make_engine, run_to_end, tiny  # noqa: F401 (a fixture)

PROMPTS = [[5, 6, 7], list(range(3, 80)), [9] * 40, list(range(20, 30))]


def _params(i):
    return SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True)


def test_concurrent_streams_match_the_sync_engine(tiny):
    sync = make_engine(tiny)
    for i, prompt in enumerate(PROMPTS):
        sync.add_request(str(i), prompt, _params(i))
    expected = {k: v.outputs[0].token_ids for k, v in run_to_end(sync).items()}

    async def consume(engine, i):
        snapshots = [out async for out in engine.generate(str(i), PROMPTS[i], _params(i))]
        lengths = [len(s.outputs[0].token_ids) for s in snapshots]
        assert lengths == sorted(lengths) and snapshots[-1].finished and not any(s.finished for s in snapshots[:-1])
        return snapshots[-1].outputs[0].token_ids

    async def main():
        engine = AsyncLLMEngine(make_engine(tiny))
        try:
            return await asyncio.gather(*(consume(engine, i) for i in range(len(PROMPTS))))
        finally:
            await engine.shutdown(1.0)

    results = asyncio.run(main())
    assert {str(i): r for i, r in enumerate(results)} == expected


def test_errors_before_first_output_and_abort_on_disconnect(tiny):
    async def main():
        engine = AsyncLLMEngine(make_engine(tiny, blocks=8, max_waiting=0))
        with pytest.raises(QueueFullError):
            await anext(engine.generate("q", [5], SamplingParams()))
        await engine.shutdown(0)

        engine = AsyncLLMEngine(make_engine(tiny, blocks=8))
        with pytest.raises(ContextLengthExceededError):
            await anext(engine.generate("long", [5] * 120, SamplingParams(max_tokens=20)))
        stream = engine.generate("gone", [5, 6], SamplingParams(max_tokens=100, ignore_eos=True))
        first = await anext(stream)
        assert not first.finished
        await stream.aclose()  # the client went away
        for _ in range(1000):  # up to 10 s on a loaded machine
            stats = engine.stats()
            if stats.num_running == 0 and stats.kv_blocks_free == stats.kv_blocks_total:
                break
            await asyncio.sleep(0.01)
        assert stats.num_running == 0 and stats.kv_blocks_free == stats.kv_blocks_total
        await engine.shutdown(0)
        with pytest.raises(EngineDeadError):
            await anext(engine.generate("late", [5], SamplingParams()))

    asyncio.run(main())


def test_a_caller_cancelled_before_admission_leaves_no_request_behind(tiny):
    """Cancelled while its request is on the way to the engine thread (the thread held up in the add): the
    engine loop lives on and nothing is computed for the client that is gone."""
    import threading

    engine = make_engine(tiny)
    entered, release = threading.Event(), threading.Event()
    add_request = engine.add_request

    def slow_add(request_id, *args, **kwargs):
        if request_id == "gone":
            entered.set()
            release.wait(10)
        return add_request(request_id, *args, **kwargs)

    engine.add_request = slow_add

    async def main():
        async_engine = AsyncLLMEngine(engine)
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        task = asyncio.create_task(anext(async_engine.generate("gone", [5, 6, 7], params)))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        # Commands reach the engine in order: once a later request has run, the cancelled one was dealt with.
        outputs = [out async for out in async_engine.generate("next", [9, 10], params)]
        assert outputs[-1].finished and async_engine.is_running
        stats = async_engine.stats()
        assert not engine.has_unfinished_requests() and stats.kv_blocks_free == stats.kv_blocks_total
        assert (stats.prompt_tokens, stats.generation_tokens) == (2, 8)  # only "next" was computed
        await async_engine.shutdown(0)

    asyncio.run(main())


def test_shutdown_lets_running_requests_finish(tiny):
    async def main():
        engine = AsyncLLMEngine(make_engine(tiny))
        stream = engine.generate("r", [5, 6], SamplingParams(max_tokens=20, ignore_eos=True))
        first = await anext(stream)
        stopping = asyncio.create_task(engine.shutdown(30.0))
        rest = [out async for out in stream]
        await stopping
        return first, rest

    first, rest = asyncio.run(main())
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "length"
    assert len(rest[-1].outputs[0].token_ids) == 20
