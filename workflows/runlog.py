"""A per-run log file for everything that is not tierflow's own output.

Ray's C++ core, its forwarded worker lines, Serve's controller and MLflow all write to the process's
stdout/stderr (some from threads or child processes), so the redirection is at the file-descriptor
level: only what tierflow prints through the terminal stream this returns reaches the user.
The log is kept with the run in the store (`runs/<run_id>/run.log`), read by `tierflow show RUN --logs`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import TextIO

from storage import ArtifactStore, StorageError, validate_name
from storage.config import default_home

LOG_NAME = "run.log"
# tierflow's own warnings still reach the terminal; everything else goes to the file only.
OWN_LOGGERS = ("workflows", "actors", "serving", "storage")


def local_log_path(run_id: str) -> Path:
    return Path(default_home()) / "logs" / f"{validate_name(run_id, 'run id')}.log"


def store_key(run_id: str) -> str:
    return f"runs/{validate_name(run_id, 'run id')}/{LOG_NAME}"


class RunLog:
    """Context manager: fds 1 and 2 go to `path` (and, with `stream`, also to the terminal)."""

    def __init__(self, path: Path, *, stream: bool = False) -> None:
        self.path = path
        self.stream = stream
        self.terminal: TextIO = sys.stdout
        self._saved: tuple[int, int] | None = None
        self._handler: logging.Handler | None = None
        self._tee: threading.Thread | None = None

    def __enter__(self) -> TextIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for s in (sys.stdout, sys.stderr):
            s.flush()
        out, err = os.dup(1), os.dup(2)
        self._saved = (out, err)
        self.terminal = io.TextIOWrapper(
            os.fdopen(os.dup(out), "wb", buffering=0), encoding="utf-8", line_buffering=True, write_through=True
        )
        log_fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if self.stream:
            # A pipe and a copier thread: the file keeps everything, the terminal's stderr sees it live.
            read_fd, write_fd = os.pipe()
            self._tee = threading.Thread(
                target=_tee, args=(read_fd, log_fd, os.dup(err)), daemon=True, name="tierflow-log-tee"
            )
            self._tee.start()
            target = write_fd
        else:
            target = log_fd
        os.dup2(target, 1)
        os.dup2(target, 2)
        os.close(target)
        self._handler = logging.StreamHandler(self.terminal)
        self._handler.setLevel(logging.WARNING)
        self._handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        if not self.stream:  # streamed logs already show them
            for name in OWN_LOGGERS:
                logging.getLogger(name).addHandler(self._handler)
        return self.terminal

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for name in OWN_LOGGERS:
            if self._handler is not None:
                logging.getLogger(name).removeHandler(self._handler)
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        if self._saved:
            out, err = self._saved
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.close(out)
            os.close(err)
            self._saved = None
        if self._tee is not None:
            # Drain what is in the pipe; child processes (Ray's) may hold it open, hence only a bounded wait.
            self._tee.join(timeout=2.0)

    def keep(self, store: ArtifactStore, run_id: str) -> str:
        """Copy the log next to the run's journal (encrypted when the durable tier is). Returns its URL."""
        try:
            store.durable.write(store_key(run_id), self.path.read_bytes())
        except (OSError, StorageError) as exc:
            print(f"note: could not keep the log in the store ({exc}); it stays at {self.path}", file=self.terminal)
            return str(self.path)
        return f"{store.durable.url.rstrip('/')}/{store_key(run_id)}"


def _tee(read_fd: int, log_fd: int, term_fd: int) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as src:
        while chunk := src.read(65536):
            os.write(log_fd, chunk)
            with contextlib.suppress(OSError):
                os.write(term_fd, chunk)


def read_log(store: ArtifactStore, run_id: str) -> bytes:
    """The run's log from the store, else the local copy a run that did not finish left behind."""
    key = store_key(run_id)
    if store.durable.exists(key):
        return store.durable.read(key)
    local = local_log_path(run_id)
    if local.exists():
        return local.read_bytes()
    raise StorageError(
        f"no log for run {run_id!r} in {store.durable.url} or {local}; "
        "runs started before logs were kept, or with another --store, have none"
    )
