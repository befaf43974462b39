"""The decoding engine (serving.batcher) on users' own generators: no Ray, real torch.

The oracle is the generator's one-sequence reference loop (`Generator.generate`): whatever the batching
mode and whoever shares the batch, a request's text must be exactly what it would be alone.
"""

import asyncio

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.batcher import Chunk, DecodeEngine, EngineBusy, EngineError, GenerationParams
from serving.generation import generator_model, load_generator
from tests.fixtures.generative_models import CausalConvLM, TinyLSTM

MODES = ("continuous", "request", "none")
PROMPTS = ["The quick brown fox", "héllo wörld", "def f(x):", "a"]


def _generator(cls: type, seed: int, max_context: int = 256):
    torch.manual_seed(seed)
    return load_generator(generator_model(cls(), builder=cls, max_context=max_context, example_prompt="hi"))


@pytest.fixture(scope="module")
def lstm():
    return _generator(TinyLSTM, 0)


@pytest.fixture(scope="module")
def conv():
    return _generator(CausalConvLM, 1)


async def collect(engine: DecodeEngine, prompt: str, params: GenerationParams) -> list[Chunk]:
    return [c async for c in engine.generate(engine.gen.encode(prompt), params)]


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def reference(gen, prompt: str, p: GenerationParams) -> str:
    return gen.generate(prompt, max_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed, stops=p.stop)


params_st = st.builds(
    GenerationParams,
    max_tokens=st.integers(1, 24),
    temperature=st.sampled_from([0.0, 0.7, 1.5]),
    seed=st.integers(0, 2**31),
    stop=st.sampled_from([(), ("e",), ("o ", "x")]),
)


@settings(derandomize=True, max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PROMPTS), params_st), min_size=1, max_size=6), st.integers(1, 4))
def test_every_mode_gives_each_request_its_text_alone(lstm, requests, max_batch):
    """Seeded outputs are identical across the three modes and equal the one-sequence loop: batch
    companions, joining mid-batch and leaving early change nothing; stop strings and max_tokens hold."""

    async def run(mode: str) -> list[str]:
        engine = DecodeEngine(lstm, mode=mode, max_batch_size=max_batch)
        try:
            got = await asyncio.gather(*(collect(engine, prompt, p) for prompt, p in requests))
        finally:
            await engine.close()
        for chunks, (_, p) in zip(got, requests, strict=True):
            assert len(chunks) <= p.max_tokens and chunks[-1].finish_reason in ("eos", "stop", "length")
            assert [c.index for c in chunks] == list(range(len(chunks)))
            assert not any(s in text(chunks) for s in p.stop)
        return [text(c) for c in got]

    expected = [reference(lstm, prompt, p) for prompt, p in requests]
    for mode in MODES:
        assert asyncio.run(run(mode)) == expected, mode


def test_stop_string_cuts_the_stream_where_it_starts(conv):
    free = reference(conv, "abc", GenerationParams(max_tokens=40))
    stop = free[10:12]  # a string the unconstrained output contains
    assert len(stop) == 2

    async def main() -> list[Chunk]:
        engine = DecodeEngine(conv)
        try:
            return await collect(engine, "abc", GenerationParams(max_tokens=40, stop=(stop,)))
        finally:
            await engine.close()

    chunks = asyncio.run(main())
    assert text(chunks) == free[: free.index(stop)] and chunks[-1].finish_reason == "stop"


async def _arrival_mid_batch(gen, mode: str) -> tuple[list[Chunk], list[Chunk]]:
    """A long request runs; after its third token a short one arrives."""
    engine = DecodeEngine(gen, mode=mode, max_batch_size=4)
    seen = asyncio.Event()
    long_chunks: list[Chunk] = []

    async def long_one() -> None:
        async for c in engine.generate(gen.encode("x"), GenerationParams(max_tokens=60)):
            long_chunks.append(c)
            if len(long_chunks) == 3:
                seen.set()

    async def short_one() -> list[Chunk]:
        await seen.wait()
        return await collect(engine, "y", GenerationParams(max_tokens=3))

    try:
        _, short = await asyncio.gather(long_one(), short_one())
    finally:
        await engine.close()
    return long_chunks, short


def _eos_free(gen):
    """The generator with EOS never sampled (its logit masked), so lengths are exactly max_tokens."""

    class NoEos:
        def __getattr__(self, name):
            return getattr(gen, name)

        def sample(self, logits, temperatures, generators):
            logits = logits.clone()
            logits[:, gen.eos_id] = -torch.inf
            return gen.sample(logits, temperatures, generators)

    return NoEos()


def test_continuous_batching_serves_a_newcomer_before_the_running_batch_ends(lstm):
    long, short = asyncio.run(_arrival_mid_batch(_eos_free(lstm), "continuous"))
    assert len(long) == 60 and len(short) == 3
    assert short[0].step < long[-1].step  # joined between steps, not after the batch
    assert [c.step for c in short] == [short[0].step + i for i in range(3)]  # one token per step
    assert short[-1].step < long[-1].step  # and left as soon as it finished


@pytest.mark.parametrize("mode", ["request", "none"])
def test_request_level_and_no_batching_make_the_newcomer_wait(lstm, mode):
    long, short = asyncio.run(_arrival_mid_batch(_eos_free(lstm), mode))
    assert len(long) == 60 and len(short) == 3
    assert short[0].step > long[-1].step


def test_an_abandoned_stream_frees_its_slot_at_the_next_step(lstm):
    gen = _eos_free(lstm)

    async def main() -> tuple[DecodeEngine, list[Chunk], int]:
        engine = DecodeEngine(gen, mode="continuous", max_batch_size=1)
        stream = engine.generate(gen.encode("x"), GenerationParams(max_tokens=250))
        await anext(stream)
        await anext(stream)
        waiting = asyncio.create_task(collect(engine, "y", GenerationParams(max_tokens=4)))
        await asyncio.sleep(0)
        assert engine.stats()["waiting"] == 1  # the only slot is taken
        await stream.aclose()  # the client went away
        closed_at = engine.steps
        got = await waiting
        tokens = engine.tokens
        await asyncio.sleep(0.05)
        assert engine.tokens == tokens and engine.stats()["active"] == 0  # nothing decodes any more
        await engine.close()
        return engine, got, closed_at

    engine, got, closed_at = asyncio.run(main())
    assert len(got) == 4 and engine.cancelled == 1 and engine.finished == 1
    # the step running when the client left may still finish; the next one is the newcomer's
    assert got[0].step <= closed_at + 1
    assert engine.steps <= closed_at + 1 + 4


def test_the_context_limit_ends_a_sequence(conv):
    gen = _eos_free(_generator(CausalConvLM, 1, max_context=12))

    async def main() -> list[Chunk]:
        engine = DecodeEngine(gen)
        try:
            return await collect(engine, "0123456789", GenerationParams(max_tokens=50))
        finally:
            await engine.close()

    chunks = asyncio.run(main())
    assert len(chunks) == 2 and chunks[-1].finish_reason == "context"


def test_a_failing_model_fails_its_requests_and_the_engine_keeps_serving(lstm):
    class Flaky:
        fail = True

        def __getattr__(self, name):
            return getattr(lstm, name)

        def step(self, tokens, states):
            if Flaky.fail:
                Flaky.fail = False
                raise RuntimeError("boom")
            return lstm.step(tokens, states)

    async def main() -> list[Chunk]:
        engine = DecodeEngine(Flaky())
        try:
            with pytest.raises(EngineError, match="RuntimeError: boom"):
                await collect(engine, "abc", GenerationParams(max_tokens=5))
            return await collect(engine, "abc", GenerationParams(max_tokens=5))
        finally:
            await engine.close()

    assert text(asyncio.run(main())) == reference(lstm, "abc", GenerationParams(max_tokens=5))


def test_a_full_admission_queue_refuses(lstm):
    async def main() -> None:
        engine = DecodeEngine(_eos_free(lstm), mode="none", max_waiting=1)
        running = engine.generate(lstm.encode("a"), GenerationParams(max_tokens=100))
        await anext(running)
        queued = asyncio.create_task(collect(engine, "b", GenerationParams(max_tokens=2)))
        await asyncio.sleep(0)
        with pytest.raises(EngineBusy, match="retry later"):
            await collect(engine, "c", GenerationParams(max_tokens=2))
        await running.aclose()
        assert len(await queued) == 2
        await engine.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"), ({"seed": 1.5}, "seed")],
)
def test_params_refuse_nonsense(kwargs, match):
    with pytest.raises(EngineError, match=match):
        GenerationParams(**kwargs)
