"""Writing files so that a crash or a kill never leaves half of one: every file the project writes
(checkpoints, metrics, JSON, figures, downloads, caches) goes through `atomic_write`."""

import errno
import io
import json
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Callable

import torch

# Failures of the file system being written to (not, say, of a network a download reads from).
FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM,
                      errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.ENAMETOOLONG, errno.EPIPE}
PART_SUFFIX = ".part"


class WriteError(RuntimeError):
    """A file could not be written (disk full, read-only, ...): the message names it and the cause."""


def atomic_write(path, write: Callable) -> None:
    """Call write(file) on an in-memory binary file, then put its bytes at `path`.

    A regular file (or a new one) is written to a temporary file beside it and renamed over it: the
    rename is atomic, so readers see the old file or the new one, never a part; a symbolic link to
    one keeps its link and has its target replaced. Anything else is written in place, since
    replacing it would destroy it: a device (/dev/null), a named pipe its reader waits on, this
    process's own standard output or error (/dev/stdout, even where the shell sent it to a file).

    The bytes are all made before the first is written (so a full disk is an OSError with its errno,
    whatever library serialized them); a failure of the file system is raised as one WriteError line,
    and no temporary file is left behind."""
    path = Path(path)
    buffer = io.BytesIO()
    write(buffer)  # (a download's network error is raised here, as it is: the caller's to say)
    data = buffer.getbuffer()
    try:
        fd = standard_stream(path)
        if fd is not None:
            write_to_fd(fd, data)
        elif path.exists() and not path.is_file():
            with open(path, "wb") as file:
                file.write(data)
        else:
            replace(path.resolve() if path.is_symlink() else path, data)
    except OSError as error:
        if error.errno not in FILE_SYSTEM_ERRORS:
            raise
        kept = (f"; the previous {path.name} is intact" if path.is_file() else
                "" if path.exists() else f"; no {path.name} was written")
        raise WriteError(f"{error.strerror or error} writing {path}{kept}") from None


def replace(path, data):
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    part, file = open_part(path)
    try:
        with file:
            file.write(data)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, path)


def standard_stream(path):
    """1 or 2 if `path` is the file this process's standard output or error writes to (/dev/stdout,
    or the file the shell redirected it to), else None."""
    try:
        target = os.stat(path)
    except OSError:
        return None
    for fd in (1, 2):
        try:
            own = os.fstat(fd)
        except OSError:  # closed
            continue
        if (own.st_dev, own.st_ino) == (target.st_dev, target.st_ino):
            return fd
    return None


def write_to_fd(fd, data):
    """All of `data` to file descriptor `fd`, after what Python's own streams hold for it."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def open_part(path):
    """A new temporary file beside `path` (name unique to this process and call; permissions as the
    umask gives any new file): (its path, the open binary file)."""
    part = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{PART_SUFFIX}")
    return part, os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def remove_stale_parts(folder):
    """Remove the temporary files in `folder` that processes which no longer run left behind (killed
    while writing): a part's name holds its writer's process id. Returns the names removed."""
    removed = []
    for part in Path(folder).glob(f"*{PART_SUFFIX}"):
        pid = part.name.split(".")[-3]
        if pid.isdigit() and not process_runs(int(pid)) and stat.S_ISREG(part.lstat().st_mode):
            part.unlink(missing_ok=True)
            removed.append(part.name)
    return removed


def process_runs(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def atomic_torch_save(obj, path) -> None:
    """torch.save through `atomic_write` (torch's own file writer says a full disk as a bare
    RuntimeError, "unexpected pos")."""
    atomic_write(path, lambda file: torch.save(obj, file))


def write_json(obj, path) -> None:
    atomic_write(path, lambda file: file.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_text(text: str, path) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))
