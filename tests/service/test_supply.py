"""Model supply integrity: hashes, signed manifests, custom operators, external data and
symlinks are checked before onnxruntime ever opens a file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from onnx import TensorProto, helper, numpy_helper

from agent.broker import MosquittoBroker
from agent.cli import main
from agent.config import ModelsConfig, SecurityConfig
from agent.errors import ConfigError, ManifestError, VariantRejected
from agent.models import ModelManager
from agent.repository import SupplyPolicy, read_model, scan, verify_variant
from agent.service import Agent
from agent.session import SessionSettings
from agent.signing import SIGNATURE_FILE, sign_manifest
from tests import onnx_models

SPEC = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


def pem_keys(directory: Path, name: str = "publisher") -> tuple[Path, Path]:
    """A fresh Ed25519 key pair as PEM files: (private, public)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = directory / f"{name}.key"
    public = directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def ladder(models: Path, name: str = "lad", **kwargs: bool) -> Path:
    """A one-variant model folder built from the scale model."""
    built = onnx_models.scale_model(models.parent / "build" / f"{name}.onnx")
    return onnx_models.ladder_folder(models / name, [("fp32", built)], **SPEC, **kwargs)


def signed_policy(public: Path) -> SupplyPolicy:
    return SupplyPolicy.from_config(SecurityConfig(manifest_public_key=public))


class RecordingManager(ModelManager):
    """A model manager that keeps the events it emits, for the test to read."""

    def __init__(self, models: Path, policy: SupplyPolicy) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
        super().__init__(
            ModelsConfig(dir=models),
            SessionSettings(threads=1),
            lambda event, **fields: self.events.append((event, fields)),
        )
        self.supply_policy = policy

    def rejection_reasons(self) -> list[str]:
        return [str(f["reason"]) for e, f in self.events if e == "variant_rejected"]


# --- sha256 ---


def test_a_variant_whose_bytes_changed_is_rejected_at_every_load(tmp_path: Path) -> None:
    """The manifest's sha256 is checked each time a variant loads, not only at the scan."""
    models = tmp_path / "models"
    folder = ladder(models)
    source = read_model(folder, models)
    (folder / "fp32.onnx").write_bytes((folder / "fp32.onnx").read_bytes() + b"\0")
    with pytest.raises(VariantRejected, match=r"sha256 of fp32\.onnx is"):
        verify_variant(source, source.variants[0], models)


def test_manifest_variants_without_a_hash_are_refused_unless_allowed(tmp_path: Path) -> None:
    """security.require_sha256 (on by default) refuses a variant the manifest gives no hash."""
    models = tmp_path / "models"
    source = read_model(ladder(models, hashes=False), models)
    with pytest.raises(VariantRejected, match="gives no sha256"):
        verify_variant(source, source.variants[0], models)
    lenient = SupplyPolicy(require_sha256=False)
    assert verify_variant(source, source.variants[0], models, lenient).name == "fp32.onnx"


# --- signed manifests ---


def test_a_signed_manifest_is_accepted_and_a_tampered_one_refused(tmp_path: Path) -> None:
    """A manifest changed after signing (say, a hash swapped for a rogue file's) is refused."""
    models = tmp_path / "models"
    private, public = pem_keys(tmp_path)
    folder = ladder(models)
    sign_manifest(folder, private)
    policy = signed_policy(public)
    assert read_model(folder, models, policy).name == "lad"

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["variants"][0]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="signature does not match"):
        read_model(folder, models, policy)


def test_unsigned_foreign_signed_and_bare_models_are_refused(tmp_path: Path) -> None:
    """With a public key configured: no .sig, a .sig by another key, or a bare .onnx file
    (which has no manifest to sign) are all refused, each with its reason."""
    models = tmp_path / "models"
    _private, public = pem_keys(tmp_path)
    other_private, _other_public = pem_keys(tmp_path, "someone-else")
    ladder(models, "unsigned")
    sign_manifest(ladder(models, "foreign"), other_private)
    onnx_models.scale_model(models / "bare.onnx")
    sources, rejected = scan(models, signed_policy(public))
    assert sources == []
    reasons = {r.path.name: r.reason for r in rejected}
    assert f"no {SIGNATURE_FILE}" in reasons["unsigned"]
    assert "signature does not match" in reasons["foreign"]
    assert "bare .onnx file has no signed manifest" in reasons["bare.onnx"]


def test_a_signature_made_with_openssl_verifies(tmp_path: Path) -> None:
    """Publishers without Python can sign with `openssl pkeyutl -sign -rawin`."""
    models = tmp_path / "models"
    private, public = pem_keys(tmp_path)
    folder = ladder(models)
    subprocess.run(
        [
            "openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(private),
            "-in", str(folder / "manifest.json"), "-out", str(folder / SIGNATURE_FILE),
        ],
        check=True,
    )  # fmt: skip
    assert read_model(folder, models, signed_policy(public)).name == "lad"


def test_a_public_key_that_is_not_ed25519_is_a_config_error(tmp_path: Path) -> None:
    """An EC key (or a missing file) in security.manifest_public_key stops the start."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path = tmp_path / "ec.pub"
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ConfigError, match="an Ed25519 key is needed"):
        signed_policy(path)
    with pytest.raises(ConfigError, match="No such file"):
        signed_policy(tmp_path / "missing.pub")


# --- what the ONNX file itself asks for ---


def custom_op_model(path: Path) -> Path:
    """A graph with a node of domain `my.custom`: it needs a native custom-op library."""
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="my.custom")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[*onnx_models.OPSET, helper.make_opsetid("my.custom", 1)]
    )
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def local_function_model(path: Path) -> Path:
    """A graph calling a function defined in the model itself, in domain `local.fn`."""
    function = helper.make_function(
        "local.fn",
        "Double",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        onnx_models.OPSET,
    )
    graph = helper.make_graph(
        [helper.make_node("Double", ["x"], ["y"], domain="local.fn")],
        "with_function",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[*onnx_models.OPSET, helper.make_opsetid("local.fn", 1)],
        functions=[function],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def external_data_model(path: Path, location: str = "weights.bin") -> Path:
    """y = x * w with w (4 floats) stored in an external data file at `location`."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.array([1, 2, 3, 4], dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=onnx_models.OPSET)
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model, path, save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    if location != "weights.bin":
        # Point the tensor elsewhere (as a hostile model would) and move the data there.
        stored = onnx.load(path, load_external_data=False)
        for entry in stored.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        target = Path(location) if os.path.isabs(location) else path.parent / location
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path.parent / "weights.bin", target)
        path.write_bytes(stored.SerializeToString())
    return path


def bare(models: Path, path: Path) -> tuple[RecordingManager, str]:
    """Load the bare model at `path`; the manager and the model's name."""
    manager = RecordingManager(models, SupplyPolicy())
    source = read_model(path, models)
    manager.load(source)
    return manager, source.name


def test_a_model_needing_a_custom_op_library_is_refused(tmp_path: Path) -> None:
    """A node from an operator domain onnxruntime does not implement is refused by name."""
    models = tmp_path / "models"
    manager, name = bare(models, custom_op_model(models / "custom.onnx"))
    assert name not in manager.names()
    (reason,) = manager.rejection_reasons()
    assert "custom operator domain(s) ['my.custom']" in reason


def test_functions_defined_inside_the_model_are_not_custom_ops(tmp_path: Path) -> None:
    """A domain the model defines itself (local functions) loads and runs."""
    models = tmp_path / "models"
    manager, name = bare(models, local_function_model(models / "fn.onnx"))
    assert name in manager.names()
    result = manager.get(name).active.runtime.run({"x": np.ones((1, 4), dtype=np.float32)})
    assert result[0].tolist() == [[2.0, 2.0, 2.0, 2.0]]
    manager.close(1)


def test_external_data_inside_the_model_folder_is_served(tmp_path: Path) -> None:
    """Weights in a file beside the model load and run."""
    models = tmp_path / "models"
    folder = models / "ext"
    external_data_model(folder / "fp32.onnx")
    onnx_models.ladder_folder(folder, [("fp32", folder / "fp32.onnx")], **SPEC)
    manager = RecordingManager(models, SupplyPolicy())
    manager.load(read_model(folder, models))
    result = manager.get("ext").active.runtime.run({"x": np.ones((1, 4), dtype=np.float32)})
    assert result[0].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    manager.close(1)


@pytest.mark.parametrize("location", ["../outside.bin", "sub/../../outside.bin", "ABSOLUTE"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, location: str) -> None:
    """A tensor whose data file lies outside the model folder (relative or absolute) is
    refused before onnxruntime could read that file."""
    models = tmp_path / "models"
    if location == "ABSOLUTE":
        location = str(tmp_path / "elsewhere" / "outside.bin")
    manager, name = bare(models, external_data_model(models / "ext.onnx", location))
    assert name not in manager.names()
    (reason,) = manager.rejection_reasons()
    assert "outside its model folder" in reason


def test_external_data_is_refused_when_manifests_must_be_signed(tmp_path: Path) -> None:
    """A signature covers the manifest and, through its hashes, the .onnx files only."""
    models = tmp_path / "models"
    private, public = pem_keys(tmp_path)
    folder = models / "ext"
    external_data_model(folder / "fp32.onnx")
    onnx_models.ladder_folder(folder, [("fp32", folder / "fp32.onnx")], **SPEC)
    sign_manifest(folder, private)
    policy = signed_policy(public)
    source = read_model(folder, models, policy)
    with pytest.raises(VariantRejected, match="which a signed manifest does not cover"):
        verify_variant(source, source.variants[0], models, policy)


# --- symlinks ---


def test_symlinks_pointing_outside_the_models_directory_are_refused(tmp_path: Path) -> None:
    """A model folder, a manifest or a variant file that links out of the model directory
    is refused; a link that stays inside is served."""
    models = tmp_path / "models"
    outside = tmp_path / "outside"
    ladder(outside, "evil")
    models.mkdir()
    (models / "linked-folder").symlink_to(outside / "evil", target_is_directory=True)

    manifest_link = ladder(models, "manifest-link")
    shutil.copy(manifest_link / "manifest.json", outside / "manifest.json")
    (manifest_link / "manifest.json").unlink()
    (manifest_link / "manifest.json").symlink_to(outside / "manifest.json")

    file_link = ladder(models, "file-link")
    shutil.move(file_link / "fp32.onnx", outside / "fp32.onnx")
    (file_link / "fp32.onnx").symlink_to(outside / "fp32.onnx")

    inside = ladder(models, "inside-link")
    shared = models / ".shared"
    shared.mkdir()
    shutil.move(inside / "fp32.onnx", shared / "fp32.onnx")
    (inside / "fp32.onnx").symlink_to(shared / "fp32.onnx")

    sources, rejected = scan(models)
    reasons = {r.path.name: r.reason for r in rejected}
    assert "outside" in reasons["linked-folder"]
    assert "manifest" in reasons["manifest-link"]
    assert "outside" in reasons["manifest-link"]
    by_name = {s.name: s for s in sources}
    with pytest.raises(VariantRejected, match="outside"):
        source = by_name["file-link"]
        verify_variant(source, source.variants[0], models)
    source = by_name["inside-link"]
    assert verify_variant(source, source.variants[0], models).name == "fp32.onnx"


# --- through the agent and the command line ---


def test_an_agent_with_a_public_key_serves_only_what_its_publisher_signed(
    tmp_path: Path, broker: MosquittoBroker, make_agent: Callable[..., Agent]
) -> None:
    """`edge-agent sign-manifest` signs a folder; an agent configured with the public key
    serves it and rejects the unsigned folder and the bare file beside it."""
    models = tmp_path / "models"
    private, public = pem_keys(tmp_path)
    signed = ladder(models, "signed")
    ladder(models, "unsigned")
    onnx_models.scale_model(models / "bare.onnx")
    assert main(["sign-manifest", str(signed), "--key", str(private)]) == 0
    agent = make_agent(broker.port, models=models, security={"manifest_public_key": public})
    assert agent.manager.names() == ["signed"]


def test_an_unusable_public_key_stops_the_agent_with_a_config_error(
    tmp_path: Path, broker: MosquittoBroker, make_agent: Callable[..., Agent]
) -> None:
    """A configured key that cannot be read is refused at start (exit 78 from the CLI)."""
    with pytest.raises(ConfigError, match=r"security\.manifest_public_key"):
        make_agent(broker.port, security={"manifest_public_key": tmp_path / "missing.pub"})
