"""Reading key files: one careful implementation for tier encryption keys and pseudonym keys."""

from __future__ import annotations

import os
import stat

from storage.errors import StorageError


class SecretFileError(StorageError):
    """A key file exists but must not be used (wrong type, too open, too big)."""


def read_secret_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file only its owner can access. Raises OSError if it cannot be opened."""
    # fstat the descriptor we read, not the path (which could be swapped in between); symlinks are
    # followed (Kubernetes secret volumes need defaultMode 0400/0600 to pass). O_NONBLOCK so a FIFO or
    # device is refused below instead of blocking.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise SecretFileError(
                f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise SecretFileError(f"{path} is larger than {max_bytes} bytes; a key file is tiny — is this the right path?")
    return data
