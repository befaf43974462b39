"""The driver's failure handling: stages that raised, timed out or lost their worker, and actors that could
not start or stay unplaced. A part of `workflows.driver.Driver` (whose state it uses), kept apart so the run
loop reads top to bottom."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from actors.autoscaler import report_text
from actors.placement import PlacementDecision, decide
from actors.pool import StartFailure, explain_start_failure
from actors.ray_api import autoscaler_status, cluster_nodes, node_types
from workflows.errors import StageFailedError
from workflows.hooks import FAILED, PENDING, RETRYING, RUNNING, StageRecord
from workflows.retry import INFRA, TIMEOUT, USER

log = logging.getLogger("workflows.driver")
_START_ATTEMPTS = 3  # actors of one shape that may fail to start (a node lost while it started) before the run fails


class Failures:
    """Mixed into Driver."""

    def _start_failed(self, failure: StartFailure) -> None:
        """Ray could not start an actor: retry the start unless it can never work, then fail who waits for it."""
        shape = failure.resources.shape()
        n = self._start_failures[shape] = self._start_failures.get(shape, 0) + 1
        if not failure.definitive and n < _START_ATTEMPTS:
            log.warning(
                "an actor (%s) could not start; starting another: %s", failure.resources.describe(), failure.error
            )
            return
        cause = explain_start_failure(failure)
        self._fail_waiting(shape, cause)

    def _check_node_waits(self) -> None:
        """Show stages that wait for a node the autoscaler launches; fail them after node_wait_s."""
        if self.failure is not None:
            return
        for wait, names in self.node_waits.update(self._waiting, self.run.records, self.pool):
            for h, name in ((h, n) for h in self.hooks if hasattr(h, "on_stage_waiting") for n in names):
                h.on_stage_waiting(run=self.run, record=self.run.records[name], node_type=wait.node_type)
        for wait in self.node_waits.expired():
            self.node_waits.end(wait.shape)
            self._fail_waiting(
                wait.shape, self.node_waits.cause(wait, report_text(autoscaler_status(), wait.node_type))
            )
            self.pool.end_unidle()  # no actor request is left pending behind a failed run

    def _check_placement(self) -> None:
        """Fail stages whose actors stayed unplaced for placement_timeout_s while nothing of ours ran.

        While a stage of this run runs, what it holds comes back when it ends; with nothing running and
        no idle actor left to end, only someone else can free the resources, so waiting is bounded.
        Actors waiting for a node to be launched are bounded by node_wait_s instead.
        """
        self._check_node_waits()
        exempt = self.node_waits.shapes()
        starting = [m for m in self.pool.starting() if m.shape not in exempt]
        if self.inflight or not starting or self.failure is not None or not any(self._waiting.values()):
            self._unplaced_since = None
            return
        now = time.monotonic()
        if self._unplaced_since is None:
            self._unplaced_since = now
            return
        if now - self._unplaced_since < self.placement_timeout_s:
            return
        for shape in {m.shape for m in starting}:
            res = next(m.resources for m in starting if m.shape == shape)
            cause = (
                f"Ray has not placed an actor for {res.describe()} in {self.placement_timeout_s:g} s "
                f"while no other stage of this run was running. {self.pool.occupancy()}. "
                "Fix: free those resources (e.g. `serve shutdown` an application, end another job), lower the "
                "stage's request, or raise --placement-timeout-s if they will free up (an autoscaler launching a node)"
            )
            self._fail_waiting(shape, cause)
        self.pool.end_unidle()  # no actor request is left pending behind a failed run

    def _fail_waiting(self, shape: tuple, cause: str) -> None:
        queue = self._waiting.get(shape) or deque()
        while queue:
            rec = self.run.records[queue.popleft()]
            rec.status, rec.error = FAILED, cause
            log.error("stage %s failed: %s", rec.name, cause)
            if self.failure is None:
                self.failure = StageFailedError(rec.name, cause, "", self.run.run_id)
            self._notify(rec)

    def _queued(self) -> list[str]:
        return [n for q in self._waiting.values() for n in q]

    def _expire(self) -> None:
        now = time.monotonic()
        for ref, (name, actor, deadline) in list(self.inflight.items()):
            if deadline is not None and now >= deadline:
                del self.inflight[ref]
                timeout = self.wf.stages[name].retry.timeout_s
                cause = f"TimeoutError: stage {name!r} ran longer than timeout_s={timeout:g}"
                self._failed(self.run.records[name], actor, TIMEOUT, cause, "", ("builtins.TimeoutError",))

    def _requeue(self, rec: StageRecord) -> None:
        """A stage that waited in an actor ended for another stage's failure: it never ran, so it goes back
        to wait for an actor without counting an attempt (its inputs come from the store)."""
        rec.attempts -= 1
        rec.status = RETRYING if rec.attempts else PENDING
        self.retry_at[rec.name] = time.monotonic()
        self._candidates.add(rec.name)
        self._changed[rec.name] = None

    def _lost(self, names: tuple[str, ...], orphans: set[str], actor: Any, cause: str) -> None:
        """The call's worker died: its stages are infrastructure failures, except those that only waited in the
        actor behind the call it died in (they never ran). Calls are collected in launch order, so the call it
        died in is seen first; a stage goes back uncounted once at most, so no guess can retry it forever."""
        for name in names:
            if name in orphans and name not in self._requeued:
                self._requeued.add(name)
                self._requeue(self.run.records[name])
            else:
                self._failed(self.run.records[name], actor, INFRA, cause, "", ())

    def _failed(self, rec: StageRecord, actor: Any, kind: str, cause: str, tb: str, types: tuple[str, ...]) -> None:
        if kind == USER:  # never lent again; the calls queued in it finish first (like stages in flight elsewhere)
            self.pool.retire(actor)
        else:  # dead or stuck: the stages queued in it never ran (or died with it)
            self.calls.ended(actor, rec.name)
            self.pool.discard(actor)
        for up in [n for n, c in self.fused.items() if c == rec.name and self.run.records[n].status == RUNNING]:
            self.run.records[up].status = PENDING  # a fused stream restarts with its consumer, or never
            self._changed[up] = None
            self._candidates.add(up)
            self._scan[rec.name] = 0
        policy = self.wf.stages[rec.name].retry
        decision = policy.decide(rec.attempts, kind, types)
        fresh = self._replan(rec) if decision.retry else None
        unplaceable = fresh is not None and not fresh.feasible
        if unplaceable:
            cause = f"{cause}; cannot retry: {fresh.reason}"  # type: ignore[union-attr]
        elif fresh is not None:
            rec.decision = fresh
        if decision.retry and not unplaceable and self.failure is None:
            log.warning(
                "stage %s attempt %d failed (%s); retrying in %.1fs: %s",
                rec.name,
                rec.attempts,
                kind,
                decision.delay_s,
                cause,
            )
            rec.status, rec.error = RETRYING, cause
            self.retry_at[rec.name] = time.monotonic() + decision.delay_s
            self._candidates.add(rec.name)
            self._changed[rec.name] = None
            return
        rec.status = FAILED
        rec.error = f"{cause} ({decision.reason})" if rec.attempts > 1 or not decision.retry else cause
        log.error("stage %s failed: %s", rec.name, rec.error)
        if self.failure is None:  # keep the first; in-flight stages finish and commit
            self.failure = StageFailedError(rec.name, rec.error, tb, self.run.run_id)
        self._notify(rec)

    def _replan(self, rec: StageRecord) -> PlacementDecision:
        """After a failure (perhaps a lost node), decide again against the nodes alive now."""
        alive = cluster_nodes()
        return decide(rec.name, self.wf.stages[rec.name].resources, alive, node_types(self.declared_types, alive))
