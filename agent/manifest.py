"""The model folder's manifest.json: its schema, and reading and writing it.

The agent owns this schema; the compressor writes manifests with it, so that whatever it
produces is something the agent accepts.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.datatypes import Datatype
from agent.errors import ManifestError

MANIFEST_FILE = "manifest.json"
TIE_GAIN = 0.15
"""How much cheaper an equally accurate rung must be to be served first (by_quality)."""

# A model or variant name becomes an MQTT topic level and a file name: keep it plain.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="Letters, digits, '.', '_', '-'.")]


class TensorSpec(BaseModel):
    """One input or output of a model: name, datatype and shape (-1 for a free dimension)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256, description="Tensor name in the ONNX graph.")
    datatype: Datatype = Field(description="Open Inference Protocol datatype.")
    shape: tuple[int, ...] = Field(description="Dimensions; -1 marks a free one.")

    @field_validator("shape")
    @classmethod
    def _dims_valid(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(dim < -1 for dim in shape):
            raise ValueError("dimensions are -1 (free) or non-negative")
        return shape


class VariantMetrics(BaseModel):
    """What the compressor measured for a variant; unknown extra figures are kept."""

    # Newer compressors may record more figures; an older agent must still read them.
    model_config = ConfigDict(extra="allow")

    accuracy: float | None = Field(None, ge=0.0, le=1.0, description="Top-1 accuracy on labels.")
    fidelity: float | None = Field(
        None, ge=-1.0, le=1.0, description="Agreement with the original."
    )
    latency_ms: float | None = Field(None, ge=0.0, description="p50 latency at batch 1.")
    peak_rss_mb: float | None = Field(None, ge=0.0, description="Peak RSS of load + one run.")


# A variant file is served by the runtime its suffix names.
MODEL_SUFFIXES = (".onnx", ".tflite")
# A delegate named without a path is found by the dynamic loader in the system's library
# directories; a model folder cannot ship one (that would be native code pushed with a model).
_DELEGATE_NAME = r"^lib[A-Za-z0-9_.+-]+\.so(\.[0-9]+)*$"


# What the Edge TPU compiler puts in a model for the part the accelerator runs.
EDGETPU_OPS = frozenset({"edgetpu-custom-op"})


class DelegateSpec(BaseModel):
    """An external LiteRT delegate (an accelerator's runtime) and its options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    library: str = Field(
        min_length=1,
        max_length=4096,
        description="A library name the loader finds (libedgetpu.so.1) or an absolute path.",
    )
    options: dict[str, str] = Field(
        default_factory=dict, description="Passed to the delegate as key=value strings."
    )
    custom_ops: tuple[str, ...] | None = Field(
        None,
        description="Custom operators the delegate implements, which a model for it may use "
        "(default: edgetpu-custom-op for libedgetpu, none otherwise).",
    )

    @property
    def provided_ops(self) -> frozenset[str]:
        """The custom operators a model run with this delegate may contain."""
        if self.custom_ops is not None:
            return frozenset(self.custom_ops)
        if PurePosixPath(self.library).name.startswith("libedgetpu."):
            return EDGETPU_OPS
        return frozenset()

    @field_validator("library")
    @classmethod
    def _library_installed(cls, library: str) -> str:
        if "/" in library:
            if not PurePosixPath(library).is_absolute() or ".." in PurePosixPath(library).parts:
                raise ValueError(f"{library!r} must be a bare library name or an absolute path")
        elif not re.match(_DELEGATE_NAME, library):
            raise ValueError(f"{library!r} is not a shared library name (lib*.so[.N])")
        return library


class RuntimeOptions(BaseModel):
    """How a `.tflite` variant runs; every field is optional (None keeps the default).

    Set per model (the manifest's `runtime`) or per variant (a variant's `runtime`, which
    overrides the model's field by field). ONNX variants take none of these.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    float_io: bool | None = Field(
        None,
        description="Serve quantized int8/uint8 inputs and outputs as FP32, converting with "
        "each tensor's scale and zero point (default: served as the model declares them).",
    )
    threads: int | None = Field(
        None, ge=1, le=64, description="XNNPACK/interpreter threads (default: models.threads)."
    )
    xnnpack: bool | None = Field(
        None, description="Apply the XNNPACK CPU delegate (default: true)."
    )
    delegate: DelegateSpec | None = Field(
        None, description="An external delegate, e.g. the Edge TPU's libedgetpu.so.1."
    )
    interpreters: int | None = Field(
        None,
        ge=1,
        le=16,
        description="Interpreters per variant, for concurrent runs (default 1: runs take turns).",
    )
    probe: bool | None = Field(
        None,
        description="Open the file in a short-lived child process before the agent does, so "
        "that a file that crashes the interpreter kills only the child (default: true).",
    )

    @property
    def custom_ops(self) -> frozenset[str]:
        """Custom operators the configured delegate provides (none without a delegate)."""
        return self.delegate.provided_ops if self.delegate is not None else frozenset()

    def over(self, base: RuntimeOptions | None) -> RuntimeOptions:
        """These options with `base`'s filling every field left unset here."""
        if base is None:
            return self
        merged = base.model_dump(exclude_unset=True)
        merged.update(self.model_dump(exclude_unset=True))
        return RuntimeOptions.model_validate(merged)


class Variant(BaseModel):
    """One rung of the ladder: a file and what it costs."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    file: str = Field(
        min_length=1,
        description="Path of the .onnx or .tflite file, relative to the folder; the suffix "
        "picks the runtime (onnxruntime or LiteRT).",
    )
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Hex digest the file must have."
    )
    precision: str = Field("fp32", max_length=32, description="fp32, fp16, int8, int4, mixed…")
    sparsity: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of weights removed.")
    size_bytes: int = Field(0, ge=0, description="File size in bytes.")
    metrics: VariantMetrics = Field(default_factory=VariantMetrics)
    runtime: RuntimeOptions | None = Field(
        None, description="LiteRT options for a .tflite variant (over the model's)."
    )

    @field_validator("file")
    @classmethod
    def _file_stays_inside(cls, file: str) -> str:
        path = PurePosixPath(file)
        if path.is_absolute() or "\\" in file or any(part == ".." for part in path.parts):
            raise ValueError(f"{file!r} must be a plain path inside the model folder")
        if path.suffix not in MODEL_SUFFIXES:
            raise ValueError(f"{file!r} is not an .onnx or .tflite file")
        return file

    @model_validator(mode="after")
    def _options_fit_runtime(self) -> Variant:
        if self.runtime is not None and PurePosixPath(self.file).suffix != ".tflite":
            raise ValueError(f"runtime options apply to .tflite variants, not {self.file!r}")
        return self

    def runtime_options(self, manifest: Manifest | None) -> RuntimeOptions:
        """The options this variant runs with: its own over its model's, then defaults."""
        base = manifest.runtime if manifest is not None else None
        return (self.runtime or RuntimeOptions()).over(base)


def quality(variant: Variant, position: int) -> float:
    """What a variant is worth, to compare rungs: its accuracy on labels, else its fidelity
    to the original, else minus its position in the ladder (richest first)."""
    metrics = variant.metrics
    if metrics.accuracy is not None:
        return metrics.accuracy
    if metrics.fidelity is not None:
        return metrics.fidelity
    return -float(position)


def by_quality(variants: Sequence[Variant]) -> list[Variant]:
    """The ladder, most accurate first by measured quality. A compressed rung may measure
    more accurate than the original (pruning and int8 can act as regularisers): that is the
    one to serve when nothing is short. Of equally accurate rungs, one measured clearly
    cheaper (by TIE_GAIN in latency) than the first of them in ladder order goes first (an
    int8 rung as accurate as fp32 at a third of its cost is the better choice by every
    figure; a few percent apart is timing noise); otherwise ladder order."""
    ranked = sorted(enumerate(variants), key=lambda item: -quality(item[1], item[0]))
    out: list[Variant] = []
    for _quality, group in itertools.groupby(ranked, key=lambda item: quality(item[1], item[0])):
        tied = [variant for _position, variant in group]
        timed = [v for v in tied if v.metrics.latency_ms]
        first = tied[0].metrics.latency_ms
        cheapest = min(timed, key=lambda v: v.metrics.latency_ms or math.inf, default=None)
        if (
            first
            and cheapest is not None
            and (cheapest.metrics.latency_ms or math.inf) <= first * (1.0 - TIE_GAIN)
        ):
            tied.remove(cheapest)
            tied.insert(0, cheapest)
        out += tied
    return out


class Manifest(BaseModel):
    """A model folder: its signature and its ladder of variants, richest first."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    format: Literal[1] = Field(1, description="Manifest format version.")
    description: str = Field("", max_length=4096)
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    variants: list[Variant] = Field(min_length=1, description="Richest first, lightest last.")
    slo_p95_ms: float | None = Field(
        None,
        gt=0.0,
        description="The latency objective (p95 in the agent, ms) the policy keeps this "
        "model within; unset derives one from the richest variant's measured latency.",
    )
    batching: bool | None = Field(
        None,
        description="Whether requests may be stacked along dimension 0; None decides from "
        "the signature (every input and output has a free leading dimension).",
    )
    runtime: RuntimeOptions | None = Field(
        None, description="LiteRT options for every .tflite variant of the model."
    )

    @model_validator(mode="after")
    def _names_unique(self) -> Manifest:
        for what, names in (
            ("variant", [v.name for v in self.variants]),
            ("variant file", [v.file for v in self.variants]),
            ("input", [t.name for t in self.inputs]),
            ("output", [t.name for t in self.outputs]),
        ):
            seen = {n for n in names if names.count(n) > 1}
            if seen:
                raise ValueError(f"duplicate {what} names: {sorted(seen)}")
        return self


def read_manifest(path: Path) -> Manifest:
    """Parse and validate a manifest file; ManifestError says what is wrong and where."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_manifest(raw, path)


def parse_manifest(raw: bytes, path: Path) -> Manifest:
    """Validate manifest bytes already read (and, when required, signature-checked)."""
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ManifestError(f"{path}: {problems}") from exc


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Write a manifest atomically, so a watcher never sees half of it."""
    data = manifest.model_dump(mode="json")
    # Unset runtime options are left out, so that agents older than them read the file.
    for holder in (data, *data["variants"]):
        if holder.get("runtime") is None:
            holder.pop("runtime", None)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
