"""The model folder's manifest.json: its schema, and reading and writing it.

The agent owns this schema; the compressor writes manifests with it, so that whatever it
produces is something the agent accepts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.datatypes import Datatype
from agent.errors import ManifestError

MANIFEST_FILE = "manifest.json"

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


class Variant(BaseModel):
    """One rung of the ladder: a file and what it costs."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    file: str = Field(min_length=1, description="Path of the .onnx file, relative to the folder.")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Hex digest the file must have."
    )
    precision: str = Field("fp32", max_length=32, description="fp32, fp16, int8, int4, mixed…")
    sparsity: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of weights removed.")
    size_bytes: int = Field(0, ge=0, description="File size in bytes.")
    metrics: VariantMetrics = Field(default_factory=VariantMetrics)

    @field_validator("file")
    @classmethod
    def _file_stays_inside(cls, file: str) -> str:
        path = PurePosixPath(file)
        if path.is_absolute() or "\\" in file or any(part == ".." for part in path.parts):
            raise ValueError(f"{file!r} must be a plain path inside the model folder")
        if path.suffix != ".onnx":
            raise ValueError(f"{file!r} is not an .onnx file")
        return file


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp, path)
