"""The decoding engine behind the generation endpoint: one loop, many streamed sequences, three batching modes.

- `continuous` (iteration-level batching): between two decoding steps, waiting requests are prefilled and
  join the running batch, and finished or abandoned sequences leave it. A newcomer's first token never
  waits for the batch it joins to finish.
- `request` (request-level batching): a batch is formed from the requests waiting when the previous batch
  has finished, and runs until its last member finishes; newcomers wait for the next batch.
- `none`: one request at a time.

Each loop iteration runs on a worker thread of its own (one, so torch calls never overlap) and hands every
token to its consumer the moment it is sampled (`call_soon_threadsafe`), so the event loop keeps accepting
and streaming while the model computes. A consumer that stops iterating (the client went away, its task was
cancelled) marks its sequence cancelled; the loop drops it, and frees its slot, before the next step.

The generator is `serving.generation.Generator`'s interface: prefill / step / stack / unstack / sample,
`eos_id`, `max_context`, `detokenizer()`, and `serving.generation.StopMatcher` for stop strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serving.config import BATCHING_MODES, ServingError

MODES = BATCHING_MODES


class EngineError(ServingError):
    """The engine cannot take or finish a request."""


class EngineBusy(EngineError):
    """The admission queue is full: the caller should answer 503 and the client retry later."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise EngineError(f"max_tokens={self.max_tokens!r}: an int >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise EngineError(f"temperature={t!r}: a finite number >= 0 (0 is greedy)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise EngineError(f"seed={self.seed!r}: an int or None")


@dataclass(frozen=True)
class Chunk:
    """One sampled token's contribution to the stream. `text` may be empty (bytes of an unfinished character,
    or text held back because it may start a stop string). `step` is the engine iteration that produced it;
    the last chunk of a sequence has a `finish_reason`: eos, stop, length (max_tokens) or context."""

    text: str
    step: int
    index: int  # 0 for the first token of the sequence
    finish_reason: str | None = None


@dataclass(eq=False)
class _Seq:
    ids: list[int]
    params: GenerationParams
    queue: asyncio.Queue[Chunk | BaseException]
    rng: Any = None  # torch.Generator when seeded
    detok: Any = None
    stop: Any = None
    state: Any = None  # this sequence's state while it is outside a batch
    last: int = -1
    produced: int = 0
    finished: bool = False
    cancelled: bool = False
    admitted_step: int = -1
    tokens_after_cancel: int = field(default=0)


class DecodeEngine:
    def __init__(
        self,
        generator: Any,
        *,
        mode: str = "continuous",
        max_batch_size: int = 16,
        max_waiting: int = 256,
    ) -> None:
        if mode not in MODES:
            raise EngineError(f"batching mode {mode!r}: use one of {', '.join(MODES)}")
        if max_batch_size < 1 or max_waiting < 1:
            raise EngineError(f"max_batch_size={max_batch_size}, max_waiting={max_waiting}: both must be >= 1")
        from serving.generation import StopMatcher  # noqa: PLC0415  # torch-free, but only engines need it

        self._stop_matcher = StopMatcher
        self.gen = generator
        self.mode = mode
        self.max_batch_size = 1 if mode == "none" else max_batch_size
        self.max_waiting = max_waiting
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []
        self._members: list[_Seq] = []  # the sequences whose states `_batched` holds, in order
        self._batched: Any = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tierflow-decode")
        self._loop: asyncio.AbstractEventLoop | None = None
        # counters for /stats and tests (read on the event loop; written there or before the thread starts)
        self.steps = 0
        self.tokens = 0
        self.finished = 0
        self.cancelled = 0
        self.step_seconds = 0.0
        self.batch_rows = 0

    # -- the consumer's side -----------------------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], params: GenerationParams) -> AsyncIterator[Chunk]:
        """The continuation of `prompt_ids`, one chunk per sampled token, the last with a finish reason."""
        self._ensure_running()
        if len(self._waiting) >= self.max_waiting:
            raise EngineBusy(f"{len(self._waiting)} requests are already waiting: retry later")
        seq = _Seq(list(prompt_ids), params, asyncio.Queue())
        if params.seed is not None:
            import torch  # noqa: PLC0415

            seq.rng = torch.Generator().manual_seed(params.seed)
        seq.detok = self.gen.detokenizer()
        seq.stop = self._stop_matcher(params.stop)
        self._waiting.append(seq)
        assert self._wake is not None  # set by _ensure_running
        self._wake.set()
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:  # abandoned: the loop drops it before its next step
                seq.cancelled = True
                self.cancelled += 1
                if self._wake is not None:
                    self._wake.set()

    def stats(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "max_batch_size": self.max_batch_size,
            "active": sum(not s.cancelled for s in self._active),
            "waiting": sum(not s.cancelled for s in self._waiting),
            "steps": self.steps,
            "tokens": self.tokens,
            "finished": self.finished,
            "cancelled": self.cancelled,
            "batch_size_mean": self.batch_rows / self.steps if self.steps else 0.0,
            "step_ms_mean": 1000 * self.step_seconds / self.steps if self.steps else 0.0,
        }

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the loop ----------------------------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._task = self._loop.create_task(self._run(), name="tierflow-decode-loop")

    async def _run(self) -> None:
        assert self._wake is not None and self._loop is not None
        while True:
            self._active = [s for s in self._active if not (s.finished or s.cancelled)]
            newcomers = self._admit()
            if not self._active and not newcomers:
                self._wake.clear()
                await self._wake.wait()
                continue
            running = list(self._active)
            self._active += newcomers
            t0 = time.perf_counter()
            try:
                await self._loop.run_in_executor(self._pool, self._iterate, running, newcomers)
            except Exception as exc:  # a model that raised: fail this iteration's sequences, keep serving
                for s in running + newcomers:
                    s.finished = True
                    s.queue.put_nowait(EngineError(f"generation failed ({type(exc).__name__}: {exc})"))
                self._members, self._batched = [], None
            self.step_seconds += time.perf_counter() - t0

    def _admit(self) -> list[_Seq]:
        while self._waiting and self._waiting[0].cancelled:
            self._waiting.popleft()
        if self.mode == "continuous":
            room = self.max_batch_size - len(self._active)
        else:  # request-level and none: a new batch only once the previous one has finished
            room = 0 if self._active else self.max_batch_size
        out = []
        while self._waiting and len(out) < room:
            s = self._waiting.popleft()
            if not s.cancelled:
                s.admitted_step = self.steps
                out.append(s)
        return out

    def _iterate(self, running: list[_Seq], newcomers: list[_Seq]) -> None:
        """One engine iteration (worker thread): a decoding step for the running batch, then the newcomers'
        prefills. Running sequences get their token before any prefill delays it."""
        step = self.steps
        if running:
            logits, self._batched = self.gen.step([s.last for s in running], self._batch_state(running))
            picks = self.gen.sample(logits, [s.params.temperature for s in running], [s.rng for s in running])
            for s, token in zip(running, picks, strict=True):
                self._advance(s, token, step)
        for s in newcomers:
            try:
                logits, s.state = self.gen.prefill(s.ids)
                token = self.gen.sample(logits[None], [s.params.temperature], [s.rng])[0]
            except Exception as exc:  # a prompt this model refuses fails that request only
                s.finished = True
                self._deliver(s, exc)
                continue
            self._advance(s, token, step)
        self.steps += 1
        self.batch_rows += len(running) + len(newcomers)

    def _batch_state(self, running: list[_Seq]) -> Any:
        """The stacked state of `running`; restacked only when the batch's membership changed."""
        if running == self._members:
            return self._batched
        if self._members:
            for s, state in zip(self._members, self.gen.unstack(self._batched), strict=True):
                s.state = state
        self._members = list(running)
        self._batched = self.gen.stack([s.state for s in running])
        for s in running:
            s.state = None
        return self._batched

    def _advance(self, s: _Seq, token: int, step: int) -> None:
        """Turn a sampled token into the sequence's next chunk; decide whether it finished."""
        index = s.produced
        s.produced += 1
        s.last = token
        self.tokens += 1
        if s.cancelled:
            s.tokens_after_cancel += 1
        reason = None
        if token == self.gen.eos_id:
            text, reason = self._tail(s), "eos"
        else:
            text, stopped = s.stop.push(s.detok.push(token))
            if stopped:
                reason = "stop"
            elif s.produced >= s.params.max_tokens:
                text, reason = text + self._tail(s), "length"
            elif len(s.ids) + s.produced >= self.gen.max_context:
                text, reason = text + self._tail(s), "context"
        if reason is not None:
            s.finished = True
            self.finished += 1
        self._deliver(s, Chunk(text, step, index, reason))

    @staticmethod
    def _tail(s: _Seq) -> str:
        """What the detokenizer and stop matcher still hold when the stream ends."""
        text, stopped = s.stop.push(s.detok.flush())
        return text if stopped else text + s.stop.flush()

    def _deliver(self, s: _Seq, item: Chunk | BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(s.queue.put_nowait, item)
