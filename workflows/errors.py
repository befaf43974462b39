"""Exceptions raised by `workflows`. `TierflowError` is the one base.

Three families stay apart (as in Dagster and httpx): the workflow is wrong (`ValidationError`,
raised before any compute), a rule broke at run time (`GateFailed`), and user code raised
(`StageFailedError`, carrying the stage name and the user's traceback).
"""

from __future__ import annotations


class TierflowError(Exception):
    """Base of every error raised by `workflows`."""


class ValidationError(TierflowError):
    """The run cannot start; nothing was executed. `problems` lists every finding."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or [message]
        super().__init__(message)


class WorkflowDefinitionError(ValidationError):
    """The workflow itself is malformed: cycle, unknown or missing input, duplicate, bad resources."""


class UnsatisfiableResourcesError(ValidationError):
    """A stage asks for resources that no node of the cluster offers."""


class WorkflowLoadError(ValidationError):
    """A workflow reference (built-in name or `file.py:object`) cannot be loaded."""


class GateFailed(TierflowError):
    """Raised by a stage when a quality gate (e.g. minimum accuracy) is not met."""


class StageFailedError(TierflowError):
    """A stage raised or its actor died; the run stopped. Committed artifacts are kept."""

    def __init__(self, stage: str, cause: str, traceback: str, run_id: str = "") -> None:
        self.stage = stage
        self.cause = cause
        self.traceback = traceback
        self.run_id = run_id
        super().__init__(f"stage {stage!r} failed: {cause}")

    def __str__(self) -> str:
        where = f" (run {self.run_id})" if self.run_id else ""
        return f"stage {self.stage!r} failed{where}: {self.cause}\n\n{self.traceback}".rstrip()
