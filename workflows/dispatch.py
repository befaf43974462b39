"""Which stages each actor holds, and when short stages may queue in a busy actor or share one call.

One actor call costs Ray ~0.5 ms of CPU here, driver and worker together (submit, run, return, wait), and a stage
that waits for the driver between two calls leaves its actor idle for a round trip. For a fan-out of
short stages both outweigh the stage itself (BENCHMARKS.md, scale), so a stage whose function is known to
be short here (its last stage took under PIPELINE_MAX_S and wrote at most SHORT_MAX_BYTES) may
- wait in a busy actor behind short stages (`actors.pool.PIPELINE_DEPTH` calls lent at once), and
- go in one call with short siblings queued behind it (`StageActor.run_batch`, MAX_BATCH at most),
so it waits at most about PIPELINE_MAX_S longer than with a call of its own. The driver gives stages with a
deadline (it starts at launch), streams and fused stream consumers a call of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

PIPELINE_MAX_S = 0.05
SHORT_MAX_BYTES = 1 << 20  # a stage's time excludes writing its output: a big one is never called short
MAX_BATCH = 16


class ActorCalls:
    """The driver's bookkeeping of calls in flight per actor, what each stage function took, and what
    each actor already has (a stage function is sent to an actor once per run)."""

    def __init__(self) -> None:
        self.running: dict[Any, list[str]] = {}  # actor -> its stages in flight, oldest first
        self.batches: dict[Any, tuple[str, ...]] = {}  # result ref of a call of several stages -> them
        self._took: dict[int, float] = {}  # id(stage function) -> how long its last stage here took (s)
        self._has_fn: dict[Any, set[int]] = {}  # actor -> id(stage function) of calls it returned from
        self._orphaned: set[str] = set()  # queued in an actor ended for another stage's failure

    def short(self, fn: Any) -> float | None:
        """What the function's last stage took, if that was short; None if unknown or long."""
        took = self._took.get(id(fn))
        return took if took is not None and took < PIPELINE_MAX_S else None

    def may_queue_behind(self, actor: Any, fn_of: Callable[[str], Any]) -> bool:
        """Only behind stages known to be short."""
        return all(self.short(fn_of(n)) is not None for n in self.running.get(actor, ()))

    def has_fn(self, actor: Any, fn: Any) -> bool:
        return id(fn) in self._has_fn.get(actor, ())

    def submitted(self, actor: Any, name: str) -> None:
        self.running.setdefault(actor, []).append(name)

    def returned(self, actor: Any, names: Iterable[str]) -> set[str]:
        """The call of `names` came back (or failed); returns those of them that were orphaned."""
        names = set(names)
        running = self.running.get(actor, [])
        running[:] = [n for n in running if n not in names]
        if not running:
            self.running.pop(actor, None)
        orphans = self._orphaned & names
        self._orphaned -= names
        return orphans

    def finished(self, actor: Any, fn: Any, duration_s: float, size_bytes: int) -> None:
        """A stage of `fn` succeeded on `actor`: its time is known, and the actor has the function."""
        self._took[id(fn)] = duration_s if size_bytes <= SHORT_MAX_BYTES else PIPELINE_MAX_S
        self._has_fn.setdefault(actor, set()).add(id(fn))

    def ended(self, actor: Any, name: str) -> None:
        """`actor` is ended for `name`'s failure: the stages queued behind it die with it, through no fault of
        their own (the driver puts them back without counting an attempt)."""
        self._orphaned.update(n for n in self.running.pop(actor, ()) if n != name)
        self._has_fn.pop(actor, None)
