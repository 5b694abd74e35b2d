"""System shared memory for clients on the same board: regions registered by name, inputs
read from them and outputs written into them, as Triton's system shared-memory extension of
the Open Inference Protocol defines it (register, unregister, status; `shared_memory_region`,
`shared_memory_offset`, `shared_memory_byte_size` on a tensor).

A region is a POSIX shared-memory object, a file of /dev/shm opened by its key only (no
path). The registry knows no transport: the control commands and the data plane call it
with the owner the transport learnt (the user level of the topic, or None).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import structlog

from agent.config import SharedMemoryConfig
from agent.errors import InvalidRequest, SharedMemoryError
from agent.protocol import (
    MAX_NAME_CHARS,
    InferenceRequest,
    RequestError,
    SharedMemoryRef,
    clip,
    tensor_buffer,
    tensor_from_bytes,
)

log = structlog.get_logger(__name__)

SHM_DIR = Path("/dev/shm")
"""Where POSIX shared-memory objects live on Linux; regions are opened nowhere else."""

_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
"""A key's name in SHM_DIR: no '/', no '..', no hidden file, at most NAME_MAX bytes."""

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
"""No symbolic link (a client's link to a file of the agent's), never block on a FIFO."""


def key_name(key: object) -> str:
    """The file name of a shared-memory key in SHM_DIR.

    A key is a POSIX shared-memory name: `/input0` as shm_open() takes it (what
    tritonclient's helpers pass), or `input0`. Anything that is a path is refused.
    """
    if not isinstance(key, str):
        raise SharedMemoryError("'key' must be a string")
    name = key[1:] if key.startswith("/") else key
    if not _KEY.fullmatch(name):
        raise SharedMemoryError(
            f"key {clip(key)} is not a shared-memory name: one optional leading '/', then "
            "letters, digits, '_', '.' or '-' (at most 255, not starting with '.')"
        )
    return name


class Region:
    """One registered region: an open file of /dev/shm and, for zero-copy, its mapping.

    Every use checks the file first (fstat): a key unlinked since (its client destroyed it
    or went away) or a file shrunk below the region is refused, never read. Uses and close()
    take the region's lock: a descriptor closed by an unregister is never used (its number
    may already be another file's).
    """

    def __init__(
        self,
        name: str,
        key: str,
        offset: int,
        byte_size: int,
        owner: str | None,
        *,
        zero_copy: bool,
    ) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self.owner = owner
        self.closed = False
        self._lock = threading.Lock()
        self._fd, self.writable = _open_key(key_name(key))
        try:
            self.check_file()
            # mmap offsets are whole pages: the mapping starts at the page of `offset`.
            self._map_start = offset - offset % mmap.ALLOCATIONGRANULARITY
            self._map = self._mapping() if zero_copy else None
        except BaseException as exc:
            os.close(self._fd)
            if isinstance(exc, OSError):  # mmap refused (no memory, a limit)
                raise SharedMemoryError(
                    f"region {name!r} cannot be mapped: {exc.strerror or exc}"
                ) from None
            raise

    def status(self) -> dict[str, Any]:
        """The region as Triton's status lists it."""
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }

    @property
    def gone(self) -> bool:
        """True once the key has been unlinked (no client can open it any more) or the
        region closed."""
        with self._lock:
            return self.closed or os.fstat(self._fd).st_nlink == 0

    def read(self, label: str, ref: SharedMemoryRef) -> memoryview:
        """The bytes at `ref`: a read-only view of the mapping, or a copy read with pread."""
        with self._lock:
            return self._read(label, ref)

    def _read(self, label: str, ref: SharedMemoryRef) -> memoryview:
        start = self.start_of(label, ref)
        self.check_file()
        if self._map is not None:
            at = start - self._map_start
            return memoryview(self._map)[at : at + ref.byte_size].toreadonly()
        # Uninitialised (bytearray would zero it first): pread fills every byte or fails.
        data = memoryview(cast(Any, np.empty(ref.byte_size, np.uint8)))
        # pread on a file shrunk meanwhile returns fewer bytes; it cannot raise SIGBUS.
        if os.preadv(self._fd, [data], start) != ref.byte_size:
            raise SharedMemoryError(f"{label}: region {self.name!r} shrank while being read")
        return data

    def write(self, label: str, ref: SharedMemoryRef, data: memoryview) -> None:
        """Put `data` at `ref` (at most `ref.byte_size` bytes)."""
        with self._lock:
            self._write(label, ref, data)

    def _write(self, label: str, ref: SharedMemoryRef, data: memoryview) -> None:
        start = self.output_start(label, ref)
        if len(data) > ref.byte_size:
            raise SharedMemoryError(
                f"{label}: {len(data)} bytes do not fit in the {ref.byte_size} bytes given "
                f"by shared_memory_byte_size in region {self.name!r}"
            )
        self.check_file()
        if self._map is not None:
            at = start - self._map_start
            self._map[at : at + len(data)] = data
            return
        written = 0
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], start + written)

    def close(self) -> None:
        """Release the file. A mapping still lent to a running request stays until that
        request's arrays are gone (the garbage collector then unmaps it)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            os.close(self._fd)
        if self._map is not None:
            # BufferError: an input view is still in use; it is unmapped with the view.
            with contextlib.suppress(BufferError):
                self._map.close()

    def output_start(self, label: str, ref: SharedMemoryRef) -> int:
        """Where an output at `ref` starts in the file, once it is known it may go there."""
        if not self.writable:
            raise SharedMemoryError(
                f"{label}: region {self.name!r} is read-only to the agent (the key's file "
                "permissions); give the agent's user write access to receive outputs there"
            )
        return self.start_of(label, ref)

    def start_of(self, label: str, ref: SharedMemoryRef) -> int:
        """Where `ref` starts in the file, once it is known to lie inside the region."""
        if self.closed:
            raise SharedMemoryError(f"{label}: region {self.name!r} was unregistered")
        if ref.offset + ref.byte_size > self.byte_size:
            raise SharedMemoryError(
                f"{label}: offset {ref.offset} + byte_size {ref.byte_size} is beyond region "
                f"{self.name!r} of {self.byte_size} bytes"
            )
        return self.offset + ref.offset

    def check_file(self) -> None:
        """Refuse a file that is no longer what was registered: removed, or too short."""
        info = os.fstat(self._fd)
        if not stat.S_ISREG(info.st_mode):
            raise SharedMemoryError(f"key {clip(self.key)} is not a shared-memory object")
        if info.st_nlink == 0:
            raise SharedMemoryError(
                f"region {self.name!r}: key {clip(self.key)} was removed (its client "
                "destroyed it or went away)"
            )
        end = self.offset + self.byte_size
        if info.st_size < end:
            raise SharedMemoryError(
                f"region {self.name!r}: key {clip(self.key)} holds {info.st_size} bytes, "
                f"offset {self.offset} + byte_size {self.byte_size} needs {end}"
            )

    def _mapping(self) -> mmap.mmap:
        """The region's pages (from the page its offset falls in), read-only when the agent
        may not write the file."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        length = self.offset + self.byte_size - self._map_start
        return mmap.mmap(self._fd, length, mmap.MAP_SHARED, prot, offset=self._map_start)


def _open_key(name: str) -> tuple[int, bool]:
    """An open descriptor of SHM_DIR/name, and whether the agent may write it."""
    try:
        directory = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SharedMemoryError(f"{SHM_DIR} cannot be opened: {exc.strerror}") from None
    try:
        # Only a regular file is opened (checked again on the descriptor: it may change).
        mode = os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "not a shared-memory object"
            raise SharedMemoryError(f"key {name!r} is {what}")
        try:
            return os.open(name, os.O_RDWR | _OPEN_FLAGS, dir_fd=directory), True
        except PermissionError:
            return os.open(name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=directory), False
    except FileNotFoundError:
        raise SharedMemoryError(f"key {name!r} not found in {SHM_DIR}") from None
    except PermissionError:
        raise SharedMemoryError(
            f"key {name!r}: permission denied (the agent's user cannot read it)"
        ) from None
    except OSError as exc:  # ELOOP: a symbolic link; others: say what the system said
        reason = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise SharedMemoryError(f"key {name!r} cannot be opened: {reason}") from None
    finally:
        os.close(directory)


class SharedMemoryRegistry:
    """The registered regions, per owner, bounded in number and in bytes."""

    def __init__(self, config: SharedMemoryConfig) -> None:
        self._config = config
        self._regions: dict[tuple[str | None, str], Region] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def register(
        self, name: str, key: str, offset: int, byte_size: int, owner: str | None
    ) -> Region:
        """Open and check the region; SharedMemoryError says why it cannot be used."""
        self._require_enabled()
        self.sweep()
        if (owner, name) in self._regions:
            raise SharedMemoryError(f"region {name!r} is already registered; unregister it first")
        if len(self._regions) >= self._config.max_regions:
            raise SharedMemoryError(
                f"{len(self._regions)} regions are registered, the limit (shm.max_regions)"
            )
        total = sum(r.byte_size for r in self._regions.values())
        if total + byte_size > self._config.max_bytes:
            raise SharedMemoryError(
                f"registering {byte_size} bytes would bring the regions to {total + byte_size}, "
                f"over shm.max_bytes = {self._config.max_bytes}"
            )
        region = Region(name, key, offset, byte_size, owner, zero_copy=self._config.zero_copy)
        with self._lock:
            if (owner, name) in self._regions:  # registered meanwhile by the same owner
                region.close()
                raise SharedMemoryError(f"region {name!r} is already registered")
            self._regions[(owner, name)] = region
        log.info("shm_region_registered", owner=owner, **region.status())
        return region

    def unregister(self, name: str | None, owner: str | None) -> list[str]:
        """Drop the owner's region `name`, or all of its regions; the names dropped."""
        self._require_enabled()
        with self._lock:
            keys = [k for k in self._regions if k[0] == owner and name in (None, k[1])]
            dropped = [self._regions.pop(k) for k in keys]
        for region in dropped:
            region.close()
            log.info("shm_region_unregistered", owner=owner, name=region.name)
        return [region.name for region in dropped]

    def status(self, name: str | None, owner: str | None) -> list[dict[str, Any]]:
        """The owner's regions (or only `name`), as Triton's status lists them."""
        self._require_enabled()
        self.sweep()
        if name is not None:
            return [self.get(name, owner, "status").status()]
        with self._lock:
            regions = [r for (o, _), r in self._regions.items() if o == owner]
        return [r.status() for r in sorted(regions, key=lambda r: r.name)]

    def get(self, name: str, owner: str | None, label: str) -> Region:
        """The owner's region `name`; one whose key was removed is dropped and refused."""
        self._require_enabled()
        region = self._regions.get((owner, name))
        if region is None:
            raise SharedMemoryError(f"{label}: no shared-memory region {name!r} is registered")
        if region.gone:
            self._drop(region, "key removed")
            raise SharedMemoryError(
                f"{label}: region {name!r} was dropped: its key {clip(region.key)} was removed "
                "(its client destroyed it or went away)"
            )
        return region

    def sweep(self) -> None:
        """Drop the regions whose key was unlinked: their client destroyed them or exited
        (Python's resource tracker unlinks what a process created)."""
        with self._lock:
            regions = list(self._regions.values())
        for region in regions:
            if region.gone:
                self._drop(region, "key removed")

    def close(self) -> None:
        with self._lock:
            regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            region.close()

    def _drop(self, region: Region, reason: str) -> None:
        with self._lock:
            if self._regions.get((region.owner, region.name)) is region:
                del self._regions[(region.owner, region.name)]
        region.close()
        log.info("shm_region_dropped", owner=region.owner, name=region.name, reason=reason)

    def _require_enabled(self) -> None:
        if not self._config.enabled:
            raise SharedMemoryError(
                "shared memory is off on this agent (set shm.enabled = true to use it)"
            )


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request's outputs go: the regions resolved when it was decoded."""

    outputs: Mapping[str, tuple[Region, SharedMemoryRef]]

    def write(self, arrays: Mapping[str, np.ndarray]) -> dict[str, SharedMemoryRef]:
        """Write each output placed in shared memory; the places as the reply shows them
        (`shared_memory_byte_size` is what was written)."""
        written: dict[str, SharedMemoryRef] = {}
        for name, (region, ref) in self.outputs.items():
            if name not in arrays:
                continue
            data = tensor_buffer(arrays[name])
            region.write(f"output {name!r}", ref, data)
            written[name] = SharedMemoryRef(ref.region, ref.offset, len(data))
        return written


def attach(
    registry: SharedMemoryRegistry | None, request: InferenceRequest, owner: str | None
) -> None:
    """Read the request's shared-memory inputs into `request.inputs` and resolve where its
    outputs go (`request.shared_memory`); RequestError, with the request's address, if not."""
    try:
        if registry is None:
            raise SharedMemoryError("shared memory is not available on this agent")
        for name, shared in (request.shared_inputs or {}).items():
            label = f"input {name!r}"
            region = registry.get(shared.ref.region, owner, label)
            raw = region.read(label, shared.ref)
            request.inputs[name] = tensor_from_bytes(label, shared.datatype, shared.shape, raw)
        places = {
            o.name: (registry.get(o.shared.region, owner, f"output {o.name!r}"), o.shared)
            for o in request.outputs or ()
            if o.shared is not None
        }
        for name, (region, ref) in places.items():
            region.output_start(f"output {name!r}", ref)
        request.shared_memory = Placement(places)
    except RequestError as exc:
        exc.request_id, exc.reply_to = request.id, request.reply_to
        raise
    except InvalidRequest as exc:
        raise RequestError(str(exc), request.id, request.reply_to) from None


def region_name(body: Mapping[str, Any], required: bool) -> str | None:
    """The `name` of a control request: a region's name, required or optional."""
    name = body.get("name")
    if name is None and not required:
        return None
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise SharedMemoryError(f"'name' must be a string of 1 to {MAX_NAME_CHARS} characters")
    return name


__all__ = ["SHM_DIR", "Placement", "Region", "SharedMemoryRegistry", "attach", "key_name"]
