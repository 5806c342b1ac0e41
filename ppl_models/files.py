"""Writing files so that a crash or a kill never leaves half of one: every file the project writes
(checkpoints, metrics, JSON, downloads, caches) goes through `atomic_write`."""

import errno
import io
import json
import os
import secrets
from pathlib import Path
from typing import Callable

import torch

# Failures of the file system being written to (not, say, of a network a download reads from).
FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM,
                      errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.ENAMETOOLONG}


class WriteError(RuntimeError):
    """A file could not be written (disk full, read-only, ...): the message names it and the cause."""


def atomic_write(path, write: Callable) -> None:
    """Call write(file) on a binary temporary file beside `path`, then rename it over `path`: the
    rename is atomic, so readers see the old file or the new one, never a part. The temporary file
    has a unique name (two writers never share one) and is removed if writing fails; a failure of
    the file system is raised as one WriteError line."""
    path = Path(path)
    try:
        part, file = open_part(path)
        try:
            with file:
                write(file)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, path)
    except OSError as error:
        if error.errno not in FILE_SYSTEM_ERRORS:  # e.g. a download's network error: the caller's to say
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise WriteError(f"{error.strerror or error} writing {path}; {kept}") from None


def open_part(path):
    """A new temporary file beside `path` (name unique to this process and call; permissions as the
    umask gives any new file): (its path, the open binary file)."""
    part = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    return part, os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def atomic_torch_save(obj, path) -> None:
    """torch.save, serialized in memory first: torch's own writer reports a full disk as a bare
    RuntimeError ("unexpected pos"), a plain file write as the OSError it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda file: file.write(buffer.getbuffer()))


def write_json(obj, path) -> None:
    atomic_write(path, lambda file: file.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_text(text: str, path) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))
