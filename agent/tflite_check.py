"""Checks a `.tflite` file before a LiteRT interpreter opens it, so that a corrupt or crafted
push is rejected with a reason instead of reaching native code that trusts it: the "TFL3"
identifier, every table, vector and string inside the file, every index (operator codes,
tensors, buffers, subgraphs) inside its vector, constant data sizes that match their tensor's
shape, only builtin operators this LiteRT has (no custom ones), and no external buffers.

The agent does not depend on the flatbuffers package: this reads the format itself, bounds
checked at every step. The file is memory-mapped; buffer payloads are never copied.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import VariantRejected
from agent.files import open_regular

FILE_IDENTIFIER = b"TFL3"
# The highest BuiltinOperator of the LiteRT schema pinned in the `litert` extra (2.3.0); a
# test compares it with the installed schema, so that a version bump shows here.
MAX_BUILTIN_CODE = 209
CUSTOM_CODE = 32
DELEGATE_CODE = 51  # a delegate's own kernel: never in a file written by a converter
PLACEHOLDER_CODE = 127  # "see builtin_code": never an operator itself
_MAX_RANK = 16
_MAX_SUBGRAPHS = 10_000

# Bits per element of each TensorType (schema.fbs); None: no fixed size (strings, resources).
ELEMENT_BITS: dict[int, int | None] = {
    0: 32, 1: 16, 2: 32, 3: 8, 4: 64, 5: None, 6: 8, 7: 16, 8: 64, 9: 8, 10: 64, 11: 128,
    12: 64, 13: None, 14: None, 15: 32, 16: 16, 17: 4, 18: 16, 19: 2, 20: 4, 21: 8, 22: 8,
}  # fmt: skip

# Field slots (schema.fbs order) of the tables read here.
_M_OPCODES, _M_SUBGRAPHS, _M_BUFFERS, _M_METADATA, _M_SIGNATURES = 1, 2, 4, 6, 7
_M_EXT_GROUPS, _M_EXT_BUFFERS = 8, 9
_OC_DEPRECATED, _OC_CUSTOM, _OC_BUILTIN = 0, 1, 3
_SG_TENSORS, _SG_INPUTS, _SG_OUTPUTS, _SG_OPERATORS = 0, 1, 2, 3
_T_SHAPE, _T_TYPE, _T_BUFFER, _T_NAME, _T_QUANT, _T_VARIABLE, _T_SPARSITY = 0, 1, 2, 3, 4, 5, 6
_T_SIGNATURE, _T_EXTERNAL = 7, 10
_Q_SCALE, _Q_ZERO_POINT, _Q_DETAILS_TYPE, _Q_DIMENSION = 2, 3, 4, 6
_OP_OPCODE, _OP_INPUTS, _OP_OUTPUTS, _OP_OPTIONS_TYPE, _OP_OPTIONS = 0, 1, 2, 3, 4
_OP_INTERMEDIATES, _OP_LARGE_OFFSET, _OP_LARGE_SIZE = 8, 9, 10
_B_DATA, _B_OFFSET, _B_SIZE = 0, 1, 2
_SD_INPUTS, _SD_OUTPUTS, _SD_SUBGRAPH = 0, 1, 4
_TM_TENSOR = 1
_MD_BUFFER = 1
# Builtin options that name subgraphs: IfOptions, WhileOptions (two each), CallOnceOptions.
_SUBGRAPH_OPTIONS = {92: 2, 93: 2, 103: 1}


class TfliteFormatError(ValueError):
    """The file is not a well-formed TFLite flatbuffer."""


@dataclass
class TfliteFacts:
    """What the checks found in a model file."""

    builtin_codes: set[int] = field(default_factory=set)
    custom_ops: set[str] = field(default_factory=set)
    subgraphs: int = 0
    tensors: int = 0
    operators: int = 0
    signatures: int = 0


def check_tflite_file(
    path: Path, *, variant: str, custom_ops: frozenset[str] = frozenset()
) -> TfliteFacts:
    """The facts of `path`; VariantRejected with the reason when it is unsafe to open.

    `custom_ops` are the custom operators the variant's delegate implements (the Edge TPU's
    edgetpu-custom-op); any other custom operator is refused.
    """
    try:
        facts = inspect_tflite(path)
    except (OSError, TfliteFormatError) as exc:
        raise VariantRejected(
            f"variant {variant}: {path.name} is not a valid TFLite file: {exc}"
        ) from exc
    unknown = facts.custom_ops - custom_ops
    if unknown:
        raise VariantRejected(
            f"variant {variant}: {path.name} uses custom operator(s) {sorted(unknown)}, "
            "which need a native library the agent does not load"
            + (f" (its delegate provides {sorted(custom_ops)})" if custom_ops else "")
        )
    return facts


def inspect_tflite(path: Path) -> TfliteFacts:
    """Walk the whole model at `path`; TfliteFormatError names the first inconsistency."""
    # Only a regular file: a FIFO or device put in a model's place must not block the check.
    with open_regular(path) as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file cannot be mapped
            raise TfliteFormatError("empty file") from exc
    try:
        return _Reader(memoryview(mapped)).model()
    finally:
        # A view still referenced from a traceback keeps the map open until collected.
        with contextlib.suppress(BufferError):
            mapped.close()


class _Reader:
    """Bounds-checked reads of flatbuffer tables, vectors and strings."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.size = len(buf)
        # Tables and vector elements take at least 4 bytes each, so a model has fewer than
        # size/4 of them; reading many times more means objects are shared to multiply the
        # work (a crafted file), not a model. The factor leaves room for a writer that
        # shares some.
        self._budget = self.size + 1024

    # -- primitives -------------------------------------------------------------------
    def _unpack(self, fmt: str, pos: int) -> int:
        width = struct.calcsize(fmt)
        if pos < 0 or pos + width > self.size:
            raise TfliteFormatError(f"read of {width} bytes at {pos} is outside the file")
        value: int = struct.unpack_from(fmt, self.buf, pos)[0]
        return value

    def charge(self, reads: int) -> None:
        """Count `reads` table or element reads against the file's budget."""
        self._budget -= reads
        if self._budget < 0:
            raise TfliteFormatError("more reads than the file can hold (shared objects)")

    def _table(self, pos: int, what: str) -> _Table:
        self.charge(1)
        vtable = pos - self._unpack("<i", pos)
        vsize = self._unpack("<H", vtable)
        tsize = self._unpack("<H", vtable + 2)
        if vsize < 4 or vsize % 2 or vtable + vsize > self.size or pos + tsize > self.size:
            raise TfliteFormatError(f"{what}: malformed vtable")
        return _Table(self, pos, vtable, vsize, tsize, what)

    def _target(self, pos: int) -> int:
        return pos + self._unpack("<I", pos)

    def _vector(self, pos: int, width: int, what: str) -> tuple[int, int]:
        """(first element position, length) of the vector at `pos`."""
        length = self._unpack("<I", pos)
        start = pos + 4
        if start + length * width > self.size:
            raise TfliteFormatError(f"{what}: vector of {length} runs past the end of the file")
        return start, length

    # -- the model --------------------------------------------------------------------
    def model(self) -> TfliteFacts:
        if self.size < 8:
            raise TfliteFormatError(f"{self.size} bytes is too short for a flatbuffer")
        if bytes(self.buf[4:8]) != FILE_IDENTIFIER:
            raise TfliteFormatError(
                f"file identifier is {bytes(self.buf[4:8])!r}, not {FILE_IDENTIFIER!r}"
            )
        root = self._table(self._target(0), "model")
        facts = TfliteFacts()
        if root.vector_len(_M_EXT_GROUPS) or root.vector_len(_M_EXT_BUFFERS):
            raise TfliteFormatError("the model reads external buffers from other files")
        buffers = [self._buffer(t) for t in root.tables(_M_BUFFERS, "buffer")]
        opcodes = [self._opcode(t, facts) for t in root.tables(_M_OPCODES, "operator code")]
        subgraphs = list(root.tables(_M_SUBGRAPHS, "subgraph"))
        if not subgraphs:
            raise TfliteFormatError("the model has no subgraph")
        if len(subgraphs) > _MAX_SUBGRAPHS:
            raise TfliteFormatError(f"{len(subgraphs)} subgraphs")
        facts.subgraphs = len(subgraphs)
        tensor_counts = [
            self._subgraph(sg, i, buffers, len(opcodes), len(subgraphs), facts)
            for i, sg in enumerate(subgraphs)
        ]
        for meta in root.tables(_M_METADATA, "metadata"):
            if meta.u32(_MD_BUFFER) >= max(len(buffers), 1):
                raise TfliteFormatError("metadata names a buffer the model does not have")
        for sig in root.tables(_M_SIGNATURES, "signature"):
            facts.signatures += 1
            index = sig.u32(_SD_SUBGRAPH)
            if index >= len(subgraphs):
                raise TfliteFormatError(f"a signature names subgraph {index}, which is missing")
            for slot in (_SD_INPUTS, _SD_OUTPUTS):
                for entry in sig.tables(slot, "signature tensor"):
                    if entry.u32(_TM_TENSOR) >= tensor_counts[index]:
                        raise TfliteFormatError("a signature names a tensor outside its subgraph")
        return facts

    def _buffer(self, buf: _Table) -> int | None:
        """The buffer's byte length (None when empty), its bounds checked."""
        _, length = buf.vector(_B_DATA, 1)
        offset, size = buf.u64(_B_OFFSET), buf.u64(_B_SIZE)
        if offset > 1:  # data kept after the flatbuffer, at an offset from the file's start
            if offset + size > self.size:
                raise TfliteFormatError("a buffer's data lies past the end of the file")
            return size
        return length if length else None

    def _opcode(self, code: _Table, facts: TfliteFacts) -> int:
        custom = code.string(_OC_CUSTOM)
        builtin = max(code.u8(_OC_DEPRECATED, signed=True), code.i32(_OC_BUILTIN))
        if custom is not None or builtin == CUSTOM_CODE:
            facts.custom_ops.add(custom or "<unnamed>")
            return builtin
        if builtin < 0 or builtin > MAX_BUILTIN_CODE or builtin in (
            DELEGATE_CODE,
            PLACEHOLDER_CODE,
        ):
            raise TfliteFormatError(f"operator code {builtin} is not a builtin this LiteRT has")
        facts.builtin_codes.add(builtin)
        return builtin

    def _subgraph(
        self,
        sg: _Table,
        index: int,
        buffers: list[int | None],
        opcodes: int,
        subgraphs: int,
        facts: TfliteFacts,
    ) -> int:
        tensors = list(sg.tables(_SG_TENSORS, "tensor"))
        count = len(tensors)
        facts.tensors += count
        constant = [self._tensor(tensor, buffers) for tensor in tensors]
        where = f"subgraph {index}"
        for slot, what in ((_SG_INPUTS, "input"), (_SG_OUTPUTS, "output")):
            for t in sg.ints(slot):
                if not 0 <= t < count:
                    raise TfliteFormatError(f"{where}: {what} tensor {t} of {count}")
                # LiteRT 2.3.0 dies of SIGSEGV on a model input that is a constant.
                if slot == _SG_INPUTS and constant[t]:
                    raise TfliteFormatError(f"{where}: input tensor {t} is a constant")
        for op in sg.tables(_SG_OPERATORS, "operator"):
            facts.operators += 1
            self._operator(op, where, count, opcodes, subgraphs)
        return count

    def _operator(self, op: _Table, where: str, count: int, opcodes: int, subgraphs: int) -> None:
        if op.u32(_OP_OPCODE) >= opcodes:
            raise TfliteFormatError(f"{where}: an operator's code index is out of range")
        for slot in (_OP_INPUTS, _OP_OUTPUTS, _OP_INTERMEDIATES):
            for t in op.ints(slot):
                # -1 marks an optional input left out.
                if not -1 <= t < count:
                    raise TfliteFormatError(f"{where}: an operator uses tensor {t} of {count}")
        large_offset, large_size = op.u64(_OP_LARGE_OFFSET), op.u64(_OP_LARGE_SIZE)
        if large_offset > 1 and large_offset + large_size > self.size:
            raise TfliteFormatError(f"{where}: custom options lie past the end of the file")
        named = _SUBGRAPH_OPTIONS.get(op.u8(_OP_OPTIONS_TYPE))
        options = op.table(_OP_OPTIONS, "builtin options") if named else None
        if named and options is not None:
            for slot in range(named):
                if not 0 <= options.i32(slot) < subgraphs:
                    raise TfliteFormatError(f"{where}: a control-flow operator names a "
                                            "subgraph the model does not have")

    def _tensor(self, tensor: _Table, buffers: list[int | None]) -> bool:
        """Check one tensor; True when it holds constant data."""
        where = f"tensor {(tensor.string(_T_NAME, cap=80) or '<unnamed>')!r}"
        shape = list(tensor.ints(_T_SHAPE, limit=_MAX_RANK))
        signature = list(tensor.ints(_T_SIGNATURE, limit=_MAX_RANK))
        if any(d < 0 for d in shape):
            raise TfliteFormatError(f"{where}: shape {shape}")
        if signature and (len(signature) != len(shape) or any(d < -1 for d in signature)):
            raise TfliteFormatError(f"{where}: shape signature {signature} for shape {shape}")
        kind = tensor.u8(_T_TYPE)
        if kind not in ELEMENT_BITS:
            raise TfliteFormatError(f"{where}: unknown tensor type {kind}")
        if tensor.u32(_T_EXTERNAL):
            raise TfliteFormatError(f"{where}: reads an external buffer")
        index = tensor.u32(_T_BUFFER)
        if index >= max(len(buffers), 1):
            raise TfliteFormatError(f"{where}: buffer {index} of {len(buffers)}")
        quant = tensor.table(_T_QUANT, "quantization")
        if quant is not None:
            self._quantization(quant, shape, where)
        data = buffers[index] if buffers else None
        bits = ELEMENT_BITS[kind]
        sparse = tensor.table(_T_SPARSITY, "sparsity") is not None
        if data is None:
            return False
        if bits is None or sparse or tensor.u8(_T_VARIABLE):
            return True
        elements = math.prod(shape)
        # 4- and 2-bit tensors may be stored packed or one element per byte.
        allowed = {(elements * bits + 7) // 8, elements} if bits < 8 else {elements * bits // 8}
        if data not in allowed:
            raise TfliteFormatError(
                f"{where}: constant data is {data} bytes, its shape {shape} needs "
                f"{min(allowed)}"
            )
        return True

    def _quantization(self, quant: _Table, shape: list[int], where: str) -> None:
        _, scales = quant.vector(_Q_SCALE, 4)
        _, zero_points = quant.vector(_Q_ZERO_POINT, 8)
        # Per-channel: one scale and zero point per slice of one dimension. Other schemes
        # (blockwise: a details table) keep their scales elsewhere and are not judged here.
        if scales > 1 and not quant.u8(_Q_DETAILS_TYPE):
            dim = quant.i32(_Q_DIMENSION)
            if not 0 <= dim < len(shape) or shape[dim] != scales or zero_points not in (
                0,
                scales,
            ):
                raise TfliteFormatError(f"{where}: per-channel quantization does not fit {shape}")


@dataclass(frozen=True)
class _Table:
    """One table: its fields, read through its vtable."""

    reader: _Reader
    pos: int
    vtable: int
    vsize: int
    tsize: int
    what: str

    def _field(self, slot: int) -> int | None:
        entry = 4 + 2 * slot
        if entry + 2 > self.vsize:
            return None
        offset = self.reader._unpack("<H", self.vtable + entry)
        if offset == 0:
            return None
        if offset >= self.tsize:
            raise TfliteFormatError(f"{self.what}: field {slot} lies outside its table")
        return self.pos + offset

    def u8(self, slot: int, *, signed: bool = False) -> int:
        pos = self._field(slot)
        return 0 if pos is None else self.reader._unpack("<b" if signed else "<B", pos)

    def i32(self, slot: int) -> int:
        pos = self._field(slot)
        return 0 if pos is None else self.reader._unpack("<i", pos)

    def u32(self, slot: int) -> int:
        pos = self._field(slot)
        return 0 if pos is None else self.reader._unpack("<I", pos)

    def u64(self, slot: int) -> int:
        pos = self._field(slot)
        return 0 if pos is None else self.reader._unpack("<Q", pos)

    def table(self, slot: int, what: str) -> _Table | None:
        pos = self._field(slot)
        return None if pos is None else self.reader._table(self.reader._target(pos), what)

    def vector(self, slot: int, width: int) -> tuple[int, int]:
        pos = self._field(slot)
        if pos is None:
            return 0, 0
        return self.reader._vector(self.reader._target(pos), width, f"{self.what} field {slot}")

    def vector_len(self, slot: int) -> int:
        return self.vector(slot, 4)[1]

    def ints(self, slot: int, limit: int | None = None) -> Iterator[int]:
        start, length = self.vector(slot, 4)
        if limit is not None and length > limit:
            raise TfliteFormatError(f"{self.what}: field {slot} has {length} entries")
        self.reader.charge(length)
        for i in range(length):
            yield self.reader._unpack("<i", start + 4 * i)

    def tables(self, slot: int, what: str) -> Iterator[_Table]:
        start, length = self.vector(slot, 4)
        for i in range(length):
            element = start + 4 * i
            yield self.reader._table(self.reader._target(element), what)

    def string(self, slot: int, cap: int = 256) -> str | None:
        """The string's first `cap` bytes, decoded (names serve messages and comparisons)."""
        pos = self._field(slot)
        if pos is None:
            return None
        start, length = self.reader._vector(self.reader._target(pos), 1, f"{self.what} string")
        return bytes(self.reader.buf[start : start + min(length, cap)]).decode("utf-8", "replace")
