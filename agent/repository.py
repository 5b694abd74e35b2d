"""The model directory: which models it holds and which files may be served.

A folder with manifest.json is a model with a ladder of variants; a bare `.onnx` or `.tflite`
file is a model with one variant. Nothing here loads onnxruntime: it reads, validates and checks
hashes, so that the session layer only ever sees files that are safe to open.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent.config import SecurityConfig
from agent.errors import ManifestError, VariantRejected
from agent.files import RefusedFile, check_regular, open_regular, read_regular
from agent.manifest import (
    MANIFEST_FILE,
    MODEL_SUFFIXES,
    NAME_PATTERN,
    Manifest,
    Variant,
    parse_manifest,
)
from agent.onnx_check import check_model_file
from agent.signing import SIGNATURE_FILE, ManifestVerifier

BARE_VARIANT = "default"
_NAME = re.compile(NAME_PATTERN)
_HASH_CHUNK = 1024 * 1024
# A ladder of a hundred variants is a few tens of kB; more is not a manifest.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class SupplyPolicy:
    """What a model must prove before it is served (the `[security]` section)."""

    require_sha256: bool = True
    verifier: ManifestVerifier | None = None

    @classmethod
    def from_config(cls, security: SecurityConfig) -> SupplyPolicy:
        """The policy for `security`; ConfigError when its public key is unusable."""
        key = security.manifest_public_key
        return cls(
            require_sha256=security.require_sha256,
            verifier=ManifestVerifier.from_file(key) if key is not None else None,
        )


DEFAULT_POLICY = SupplyPolicy()


@dataclass(frozen=True)
class ModelSource:
    """A model as found on disk: its name, where it lives and its ladder (richest first)."""

    name: str
    path: Path
    variants: tuple[Variant, ...]
    manifest: Manifest | None
    # Size and modification time of every file the model is made of, as read: a model
    # whose stamp changed is loaded again, even when its manifest reads the same.
    stamp: tuple[tuple[str, int, int], ...] = ()

    @property
    def folder(self) -> Path:
        """The folder variant files are relative to."""
        return self.path if self.manifest is not None else self.path.parent


@dataclass(frozen=True)
class Rejection:
    """Something in the model directory that cannot be served, and why."""

    path: Path
    reason: str
    # Size and modification time of the entry (and its manifest) when it was rejected: the
    # same entry with the same reason and stamp is the same rejection, reported once.
    stamp: tuple[tuple[str, int, int], ...] = ()


def scan(
    models_dir: Path, policy: SupplyPolicy = DEFAULT_POLICY
) -> tuple[list[ModelSource], list[Rejection]]:
    """Read every model in `models_dir`; entries that cannot be served come back as rejections.

    Hidden entries (a leading '.') are skipped: they are where pushes stage their files
    before an atomic rename.
    """
    if not models_dir.is_dir():
        return [], [Rejection(models_dir, "model directory does not exist")]
    models: list[ModelSource] = []
    rejected: list[Rejection] = []
    for entry in sorted(models_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() or entry.suffix in MODEL_SUFFIXES:
            try:
                models.append(read_model(entry, models_dir, policy))
            except ManifestError as exc:
                if not os.path.lexists(entry):
                    continue  # removed while we looked: not a bad entry, just gone
                files = [entry, entry / MANIFEST_FILE] if entry.is_dir() else [entry]
                rejected.append(Rejection(entry, str(exc), _stamp(files)))
    return models, rejected


def read_model(path: Path, models_dir: Path, policy: SupplyPolicy = DEFAULT_POLICY) -> ModelSource:
    """Describe the model at `path` (a folder with a manifest, or a bare model file)."""
    _check_inside(path, models_dir)
    if path.is_dir():
        manifest_path = path / MANIFEST_FILE
        _check_inside(manifest_path, models_dir, what="manifest")
        try:
            raw = read_regular(manifest_path, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise ManifestError(f"{path}: no {MANIFEST_FILE} in the model folder") from None
        except RefusedFile as exc:
            raise ManifestError(f"{manifest_path}: refused: {exc}") from exc
        except OSError as exc:
            raise ManifestError(f"{manifest_path}: cannot read: {exc.strerror}") from exc
        if policy.verifier is not None:
            # The bytes checked are the bytes parsed: no window for a swap in between.
            signature_path = path / SIGNATURE_FILE
            _check_inside(signature_path, models_dir, what="signature")
            _refuse_special(signature_path)
            policy.verifier.verify(raw, signature_path)
        manifest = parse_manifest(raw, manifest_path)
        if manifest.name != path.name:
            raise ManifestError(
                f"{manifest_path}: name {manifest.name!r} differs from its folder {path.name!r}"
            )
        files = [manifest_path, *(path / v.file for v in manifest.variants)]
        return ModelSource(manifest.name, path, tuple(manifest.variants), manifest, _stamp(files))
    if policy.verifier is not None:
        raise ManifestError(
            f"{path}: a bare {path.suffix} file has no signed manifest "
            "(security.manifest_public_key is set)"
        )
    name = path.stem
    if not _NAME.match(name):
        raise ManifestError(f"{path}: {name!r} is not a valid model name ({NAME_PATTERN})")
    try:
        info = check_regular(path)
    except RefusedFile as exc:
        raise ManifestError(f"{path}: refused: {exc}") from exc
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from exc
    variant = Variant(name=BARE_VARIANT, file=path.name, size_bytes=info.st_size)
    return ModelSource(name, path, (variant,), None, _stamp([path]))


def _refuse_special(path: Path) -> None:
    """ManifestError when `path` exists but is not a regular file (it would block a read)."""
    try:
        check_regular(path)
    except RefusedFile as exc:
        raise ManifestError(f"{path}: refused: {exc}") from exc
    except OSError:
        pass  # missing or unreadable: the reader says so in its own words


def _stamp(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    stamps = []
    for file in files:
        try:
            info = file.stat()
        except OSError:
            stamps.append((file.name, -1, -1))  # missing now: verify_variant will say so
            continue
        stamps.append((file.name, info.st_size, info.st_mtime_ns))
    return tuple(stamps)


def verify_variant(
    source: ModelSource, variant: Variant, models_dir: Path, policy: SupplyPolicy = DEFAULT_POLICY
) -> Path:
    """The variant's file, once it is known to exist, stay inside the models, match its
    hash, and need neither custom operators nor data from outside its folder."""
    path = source.folder / variant.file
    _check_inside(path, models_dir, what=f"variant {variant.name}")
    try:
        check_regular(path)
    except FileNotFoundError:
        raise VariantRejected(f"variant {variant.name}: file {variant.file} is missing") from None
    except RefusedFile as exc:
        raise VariantRejected(f"variant {variant.name}: refused: {exc}") from exc
    except OSError as exc:
        raise VariantRejected(
            f"variant {variant.name}: cannot read {variant.file}: {exc.strerror}"
        ) from exc
    signed = policy.verifier is not None
    if variant.sha256 is None and source.manifest is not None and (policy.require_sha256 or signed):
        raise VariantRejected(
            f"variant {variant.name}: the manifest gives no sha256 for {variant.file} "
            "(security.require_sha256)"
        )
    if variant.sha256 is not None:
        try:
            digest = sha256_of(path)
        except OSError as exc:  # RefusedFile too: swapped for a FIFO since the check
            raise VariantRejected(
                f"variant {variant.name}: cannot read {variant.file}: {exc}"
            ) from exc
        if digest != variant.sha256:
            raise VariantRejected(
                f"variant {variant.name}: sha256 of {variant.file} is {digest}, "
                f"the manifest says {variant.sha256}"
            )
    if path.suffix == ".tflite":
        options = variant.runtime_options(source.manifest)
        # Imported here: an agent serving only ONNX models never loads the .tflite reader.
        from agent.tflite_check import check_tflite_file  # noqa: PLC0415

        check_tflite_file(path, variant=variant.name, custom_ops=options.custom_ops)
    else:
        check_model_file(path, source.folder, variant=variant.name, allow_external_data=not signed)
    return path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a regular file (RefusedFile otherwise), read in chunks so that a large
    model does not double the RSS."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_inside(path: Path, models_dir: Path, what: str = "model") -> None:
    # resolve() follows symlinks: a link pointing out of the model directory is refused.
    resolved, root = path.resolve(), models_dir.resolve()
    if resolved != root and root not in resolved.parents:
        error = VariantRejected if what.startswith("variant") else ManifestError
        raise error(f"{what}: {path} resolves to {resolved}, outside {root}")
