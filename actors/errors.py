"""Exceptions raised by `actors`. `ActorsError` is the one base."""

from __future__ import annotations


class ActorsError(Exception):
    """Base of every error raised by `actors`."""


class ResourceSpecError(ActorsError, ValueError):
    """A resource request is malformed (negative, non-numeric, reserved name, ...)."""


class StageExecutionError(ActorsError):
    """User code raised inside a stage actor; carries the formatted user traceback."""

    def __init__(self, stage: str, cause: str, traceback: str, cause_types: tuple[str, ...] = ()) -> None:
        self.stage = stage
        self.cause = cause
        self.traceback = traceback
        self.cause_types = cause_types  # qualified names along the user exception's MRO
        super().__init__(stage, cause, traceback, cause_types)

    def __str__(self) -> str:
        return f"stage {self.stage!r} raised {self.cause}"


class RecordError(ActorsError, ValueError):
    """A stored stage record does not have the shape `actors.record` writes (or names another artifact)."""
