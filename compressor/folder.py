"""Writing the model folder the agent watches: variant files, manifest.json and the report.

Everything is written into a hidden temporary folder beside the target and renamed into
place at the end, so the watcher never sees half a ladder; an existing folder is replaced
only when asked, and only after the new one is complete.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.manifest import MANIFEST_FILE, Manifest, Variant, VariantMetrics, write_manifest
from compressor.errors import OutputExistsError
from compressor.evaluate import Evaluation
from compressor.model import Signature

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Rung:
    """A kept variant: its evaluation and what the manifest records about it."""

    evaluation: Evaluation
    precision: str
    sparsity: float


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing output unless `force`; called before any work is done."""
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")


def model_name(stem: str) -> str:
    """A manifest-safe model name from a file stem (letters, digits, '.', '_', '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "model"
    return name[:128]


def build_manifest(
    name: str, signature: Signature, rungs: Sequence[Rung], reference: Evaluation
) -> Manifest:
    """The manifest for `rungs` (files named after the variants), validated by its schema."""
    variants = [
        Variant(
            name=rung.evaluation.name,
            file=f"{rung.evaluation.name}.onnx",
            sha256=sha256_of(rung.evaluation.path),
            precision=rung.precision,
            sparsity=round(rung.sparsity, 6),
            size_bytes=rung.evaluation.size_bytes,
            metrics=_metrics(rung.evaluation, reference),
        )
        for rung in rungs
    ]
    return Manifest(
        name=name,
        format=1,
        batching=None,
        description="Variant ladder written by edge-compress.",
        inputs=list(signature.inputs),
        outputs=list(signature.outputs),
        variants=variants,
    )


def write_folder(
    out: Path,
    manifest: Manifest,
    rungs: Sequence[Rung],
    extras: Callable[[Path], None],
    force: bool,
) -> Path:
    """Stage the folder beside `out`, then rename it into place (replacing it if `force`)."""
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for rung in rungs:
            shutil.copyfile(rung.evaluation.path, stage / f"{rung.evaluation.name}.onnx")
        write_manifest(manifest, stage / MANIFEST_FILE)
        extras(stage)
        os.chmod(stage, 0o755)  # mkdtemp makes it private; the agent may run as another user
        _swap_into_place(stage, out, force)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("folder_written", out=str(out), variants=len(rungs))
    return out


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _swap_into_place(stage: Path, out: Path, force: bool) -> None:
    if not out.exists():
        os.rename(stage, out)
        return
    check_output(out, force)
    if _exchange(stage, out):
        shutil.rmtree(stage, ignore_errors=True)  # it now holds the previous ladder
        return
    # Without an atomic exchange the folder is briefly absent: the agent sees a removal.
    log.warning("replace_not_atomic", out=str(out))
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "previous")
    os.rename(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux renameat2(RENAME_EXCHANGE); False if unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return bool(result == 0)


def _metrics(e: Evaluation, ref: Evaluation) -> VariantMetrics:
    extra: dict[str, float] = {
        "min_cosine": e.fidelity.min_cosine,
        "max_abs_error": e.fidelity.max_abs_error,
        "size_ratio": e.size_bytes / max(ref.size_bytes, 1),
        "latency_ratio": e.latency.batch1_ms / ref.latency.batch1_ms,
        "batch_size": float(e.latency.batch_size),
    }
    if e.fidelity.top1_agreement is not None:
        extra["top1_agreement"] = e.fidelity.top1_agreement
    if e.fidelity.map_iou is not None:
        extra["map_iou"] = e.fidelity.map_iou
    if e.fidelity.box_iou is not None:
        extra["box_iou"] = e.fidelity.box_iou
    if e.latency.batch_ms is not None and ref.latency.batch_ms is not None:
        extra["batch_latency_ms"] = e.latency.batch_ms
        extra["batch_latency_ratio"] = e.latency.batch_ms / ref.latency.batch_ms
    return VariantMetrics(
        accuracy=e.accuracy,
        fidelity=max(-1.0, min(1.0, e.fidelity.cosine)),
        latency_ms=e.latency.batch1_ms,
        peak_rss_mb=e.peak_rss_mb,
        **extra,
    )
