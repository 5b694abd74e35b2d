"""Reading files of the model directory without ever blocking on them.

Whoever can write to the model directory can put a FIFO, a socket or a device where a model
file should be; opening a FIFO for reading blocks until a writer comes, and a device may
never end. Only regular files are opened: checked by stat before, opened non-blocking and
without following a last symlink, and checked again on the descriptor itself, so that
nothing swapped in between the check and the read is read.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

# O_NONBLOCK: a FIFO swapped in after the stat opens at once instead of waiting for a writer
# (and is then refused); for a regular file it changes nothing.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


class RefusedFile(OSError):
    """A file the agent will not read: not a regular file, or larger than allowed.

    An OSError, so that code which only knows "cannot read" still catches it; code that
    must tell "not there yet" from "never readable" catches this first.
    """


def kind_of(mode: int) -> str:
    """What a file of this st_mode is, in words ("a FIFO", "a socket", ...)."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "not a regular file"


def check_regular(path: Path) -> os.stat_result:
    """stat() of `path` (links followed), or RefusedFile when it is not a regular file.

    FileNotFoundError and other OSErrors pass through.
    """
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise RefusedFile(f"{path.name} is {kind_of(info.st_mode)}, not a regular file")
    return info


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for binary reading, only if it is a regular file (RefusedFile if not).

    Symlinks are followed once, by resolving the path first (callers check where it
    leads); the open itself follows none, so a link swapped in afterwards is refused.
    """
    resolved = path.resolve()
    check_regular(resolved)
    try:
        fd = os.open(resolved, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link swapped in since resolve()
            raise RefusedFile(f"{path.name} became a symbolic link") from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedFile(f"{path.name} is {kind_of(info.st_mode)}, not a regular file")
        # Back to blocking reads: on a regular file the flag means nothing anyway.
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file `path`; RefusedFile when not regular or over `max_bytes`."""
    with open_regular(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RefusedFile(f"{path.name} is larger than {max_bytes} bytes")
    return data
