"""The scheduler pass by pass (``serve.engine``), on a real bundle and its real decoder.

A spy on ``NativeDecoder.step`` records what each pass ran: a long prompt is read at most
``prefill_chunk`` tokens per pass while the running sequences get a token every pass (it
never stalls them for more than one chunk), sequences join and leave a running batch, and a
cancelled job leaves at the next pass.
"""

from __future__ import annotations

import asyncio

import pytest

from edgetune.runtime import Model
from edgetune.runtime.sampling import SamplingConfig
from edgetune.serve.engine import Done, Engine, EngineConfig, Job, Token, wait_idle


@pytest.fixture(scope="module")
def model(base_int4):
    return Model.load(base_int4, backend="native", threads=2)


def spy_engine(model, **cfg) -> tuple[Engine, list[list[int]]]:
    """An Engine whose passes are recorded: per pass, the new-row count of each sequence."""
    engine = Engine(model, EngineConfig(**cfg))
    passes: list[list[int]] = []
    real = engine.decoder

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def step(self, batch, *args, **kw):
            passes.append([len(ids) for ids, _ in batch])
            return real.step(batch, *args, **kw)

    engine.decoder = Spy()
    return engine, passes


async def run(engine: Engine, job: Job, after: asyncio.Event | None = None) -> list:
    if after is not None:
        await after.wait()
    return [ev async for ev in engine.submit(job)]


def job(model, prompt: list[int], n: int) -> Job:
    return Job(prompt, SamplingConfig(max_new_tokens=n, temperature=0))


def tokens(events) -> list[int]:
    return [e.id for e in events if isinstance(e, Token)]


def test_a_long_prompt_is_read_in_chunks_beside_running_streams(model):
    short = model.encode("lamp one")
    long = (model.encode("turn the hall lights on ") * 40)[:300]
    alone_engine = Engine(model, EngineConfig())
    try:
        alone_short = tokens(asyncio.run(run(alone_engine, job(model, short, 30))))
        alone_long = tokens(asyncio.run(run(alone_engine, job(model, long, 5))))
    finally:
        alone_engine.close()
    engine, passes = spy_engine(model, prefill_chunk=64)
    try:

        async def both():
            first = asyncio.create_task(run(engine, job(model, short, 30)))
            while not passes:  # the short one is decoding before the long one arrives
                await asyncio.sleep(0.001)
            second = asyncio.create_task(run(engine, job(model, long, 5)))
            return await first, await second

        got_short, got_long = asyncio.run(both())
    finally:
        engine.close()
    assert tokens(got_short) == alone_short and tokens(got_long) == alone_long
    assert isinstance(got_short[-1], Done) and got_short[-1].completion_tokens == 30
    during = [p for p in passes if len(p) == 2 and max(p) > 1]  # the long one's prefill
    assert len(during) == -(-len(long) // 64)  # ceil(300 / 64) passes of one chunk each
    assert all(p[0] == 1 and p[1] <= 64 for p in during)  # the short one got its token


def test_sequences_join_and_leave_the_batch(model):
    engine, passes = spy_engine(model, max_batch=4)
    prompts = [model.encode(f"lamp {i}") for i in range(6)]
    try:

        async def many():
            return await asyncio.gather(*(run(engine, job(model, p, 8 + 4 * i))
                                          for i, p in enumerate(prompts)))  # fmt: skip

        results = asyncio.run(many())
    finally:
        engine.close()
    assert [r[-1].completion_tokens for r in results] == [8 + 4 * i for i in range(6)]
    assert max(len(p) for p in passes) == 4  # never more than max_batch
    sizes = [len(p) for p in passes]
    assert sizes[-1] == 1 and 4 in sizes  # full while all run, then they leave one by one


def test_a_cancelled_job_leaves_at_the_next_pass(model):
    engine = Engine(model, EngineConfig())
    try:

        async def cancel_early():
            handle = engine.submit(job(model, model.encode("lamp"), 400))
            seen = 0
            async for ev in handle:
                seen += isinstance(ev, Token)
                if seen == 3:
                    handle.cancel()
            return seen

        seen = asyncio.run(cancel_early())
        assert wait_idle(engine, 5)
        assert seen < 20 and engine.stats()["tokens"] < 20
    finally:
        engine.close()
