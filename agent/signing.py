"""Ed25519 signatures over model manifests.

The publisher signs the exact bytes of `manifest.json` with a private key kept off the
device; the signature sits beside it as `manifest.json.sig` (64 raw bytes, or the same in
base64). The device holds only the public key (`security.manifest_public_key`, PEM). Since
the manifest carries the sha256 of every variant file, one signature vouches for the
whole folder.

`cryptography` is imported on use: it is the optional `signing` extra, and a board that
does not check signatures does not need it.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError, ManifestError
from agent.manifest import MANIFEST_FILE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIGNATURE_FILE = f"{MANIFEST_FILE}.sig"
_SIGNATURE_BYTES = 64
_EXTRA_HINT = "install the `signing` extra: pip install 'edge-agent[signing]'"


class ManifestVerifier:
    """Checks manifest signatures against one public key."""

    def __init__(self, public_key: Ed25519PublicKey, source: Path) -> None:
        self._key = public_key
        self.source = source

    @classmethod
    def from_file(cls, path: Path) -> ManifestVerifier:
        """The verifier for the PEM public key at `path`; ConfigError when it is unusable."""
        try:
            from cryptography.hazmat.primitives import serialization  # noqa: PLC0415  (extra)
            from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415  (extra)
        except ImportError:
            raise ConfigError(
                f"security.manifest_public_key = {str(path)!r}: checking signatures needs "
                f"the cryptography package; {_EXTRA_HINT}"
            ) from None
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except OSError as exc:
            raise ConfigError(
                f"security.manifest_public_key = {str(path)!r}: {exc.strerror}"
            ) from exc
        except ValueError as exc:
            raise ConfigError(
                f"security.manifest_public_key = {str(path)!r}: not a PEM public key ({exc})"
            ) from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ConfigError(
                f"security.manifest_public_key = {str(path)!r}: an Ed25519 key is needed, "
                f"this is {type(key).__name__}"
            )
        return cls(key, path)

    def verify(self, manifest: bytes, signature_path: Path) -> None:
        """Raise ManifestError unless `signature_path` holds a valid signature of `manifest`."""
        from cryptography.exceptions import InvalidSignature  # noqa: PLC0415  (optional extra)

        try:
            raw = signature_path.read_bytes()
        except FileNotFoundError:
            raise ManifestError(
                f"{signature_path.parent}: no {SIGNATURE_FILE}; manifests must be signed "
                "(security.manifest_public_key is set)"
            ) from None
        except OSError as exc:
            raise ManifestError(f"{signature_path}: cannot read: {exc.strerror}") from exc
        try:
            self._key.verify(decode_signature(raw), manifest)
        except (InvalidSignature, ValueError):
            raise ManifestError(
                f"{signature_path}: the signature does not match {MANIFEST_FILE} "
                f"for the key in {self.source}"
            ) from None


def decode_signature(raw: bytes) -> bytes:
    """64 signature bytes from a raw file or its base64 text."""
    if len(raw) == _SIGNATURE_BYTES:
        return raw
    try:
        decoded = base64.b64decode(raw.strip(), validate=True)
    except binascii.Error:
        raise ValueError("neither 64 raw bytes nor base64") from None
    if len(decoded) != _SIGNATURE_BYTES:
        raise ValueError(f"an Ed25519 signature has 64 bytes, not {len(decoded)}")
    return decoded


def sign_manifest(folder: Path, private_key_path: Path) -> Path:
    """Sign `folder/manifest.json` with the PEM Ed25519 private key; returns the .sig path."""
    try:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415  (optional extra)
        from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415  (extra)
    except ImportError:
        raise ConfigError(f"signing needs the cryptography package; {_EXTRA_HINT}") from None
    key = serialization.load_pem_private_key(private_key_path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{private_key_path}: an Ed25519 private key is needed")
    signature = key.sign((folder / MANIFEST_FILE).read_bytes())
    target = folder / SIGNATURE_FILE
    # Written next to the manifest before a push; a watcher sees both in one rename.
    tmp = target.with_name(f".{SIGNATURE_FILE}.tmp")
    tmp.write_bytes(signature)
    tmp.replace(target)
    return target
