"""Retry and timeout policy: pure decisions, unit-tested without Ray (Ray Serve's decision-object habit).

Infrastructure failures (actor or worker died, node lost, OOM kill) are retried up to `retries`
times for every stage. User exceptions are retried only when the stage opts in by exception type
(`retry_on=(IOError,)`); a timeout counts as a user-level failure of type `TimeoutError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from workflows.errors import WorkflowDefinitionError

INFRA, USER, TIMEOUT = "infrastructure", "user", "timeout"
DEFAULT_RETRIES = 3  # as Ray's own default for system failures
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = DEFAULT_RETRIES
    retry_on: tuple[str, ...] = ()  # qualified exception class names, e.g. "builtins.OSError"
    backoff_s: float = 1.0
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise WorkflowDefinitionError(f"retries={self.retries!r} must be a whole number >= 0")
        if not isinstance(self.backoff_s, int | float) or self.backoff_s < 0:
            raise WorkflowDefinitionError(f"retry_backoff_s={self.backoff_s!r} must be >= 0 seconds")
        if self.timeout_s is not None and (
            isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float) or self.timeout_s <= 0
        ):
            raise WorkflowDefinitionError(f"timeout_s={self.timeout_s!r} must be a positive number of seconds")

    @classmethod
    def build(
        cls,
        retries: int = DEFAULT_RETRIES,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] = (),
        backoff_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> RetryPolicy:
        types = retry_on if isinstance(retry_on, tuple) else (retry_on,)
        for t in types:
            if not (isinstance(t, type) and issubclass(t, BaseException)):
                raise WorkflowDefinitionError(f"retry_on must hold exception classes, got {t!r}")
        return cls(retries, tuple(qualname(t) for t in types), backoff_s, timeout_s)

    def decide(self, attempt: int, kind: str, cause_types: tuple[str, ...] = ()) -> RetryDecision:
        """Whether attempt number `attempt` (1-based) that failed with `kind` gets another try."""
        if attempt > self.retries:
            return RetryDecision(False, 0.0, f"failed after {attempt} attempt{'s' if attempt > 1 else ''}")
        if kind == INFRA:
            return RetryDecision(True, self.delay(attempt), "infrastructure failure")
        matched = [t for t in cause_types if t in self.retry_on]
        if matched:
            return RetryDecision(True, self.delay(attempt), f"{matched[0]} is in retry_on")
        why = (
            "timeouts are retried only with retry_on=(TimeoutError,)"
            if kind == TIMEOUT
            else ("user exceptions are retried only when their type is in retry_on")
        )
        return RetryDecision(False, 0.0, why)

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay_s: float
    reason: str


def qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def exception_types(exc: BaseException) -> tuple[str, ...]:
    """Qualified names along the exception's MRO, so `retry_on=(OSError,)` matches its subclasses."""
    return tuple(qualname(t) for t in type(exc).__mro__ if issubclass(t, BaseException))
