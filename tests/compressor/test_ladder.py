"""The ladder end to end: a folder the agent's schema accepts, honest rungs, clean failures."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from agent.manifest import MANIFEST_FILE, read_manifest
from agent.repository import scan
from compressor.candidates import Recipe, plan
from compressor.data import load_dataset
from compressor.errors import DataError, OutputExistsError, UnsupportedModelError
from compressor.evaluate import Budget
from compressor.folder import sha256_of
from compressor.ladder import LadderResult, LadderSettings, build_ladder
from compressor.model import load_model
from compressor.quantize import Calibration

QUICK_RECIPE = Recipe(
    prune_ratios=(0.5,),
    calibrations=(Calibration.MINMAX,),
    per_tensor=False,
    student_shares=(0.25,),
    distill_augment=2,
)
QUICK = LadderSettings(
    recipe=QUICK_RECIPE,
    threads=1,
    batch_size=16,
    rounds=1,
    seconds_per_round=0.005,
    measure_memory=False,
    plot=False,
)


@pytest.fixture(scope="module")
def digits_ladder(
    tmp_path_factory: pytest.TempPathFactory,
    digits_gemm: Path,
    digits_calib: Path,
    digits_eval: Path,
) -> LadderResult:
    """One ladder of the demo-form digits model, with memory probing and the plot."""
    out = tmp_path_factory.mktemp("ladder") / "models" / "digits"
    settings = replace(QUICK, measure_memory=True, plot=True)
    return build_ladder(
        digits_gemm, out, calib=digits_calib, evaluation=digits_eval, settings=settings
    )


def test_manifest_validates_with_agent_schema(digits_ladder: LadderResult) -> None:
    """manifest.json parses with the agent's schema, is named after its folder (as the agent
    requires) and names the demo's signature."""
    manifest = read_manifest(digits_ladder.out / MANIFEST_FILE)
    assert manifest.name == "digits"
    models, rejected = scan(digits_ladder.out.parent)
    assert [m.name for m in models] == ["digits"]
    assert rejected == []
    assert [(t.name, t.shape) for t in manifest.inputs] == [("input", (-1, 64))]
    assert [(t.name, t.shape) for t in manifest.outputs] == [("probabilities", (-1, 10))]
    assert manifest.variants[0].name == "fp32"


def test_files_match_manifest(digits_ladder: LadderResult) -> None:
    """Every variant file exists with the recorded sha256 and size, and nothing else is left."""
    manifest = read_manifest(digits_ladder.out / MANIFEST_FILE)
    for variant in manifest.variants:
        path = digits_ladder.out / variant.file
        assert sha256_of(path) == variant.sha256
        assert path.stat().st_size == variant.size_bytes
    expected = {v.file for v in manifest.variants} | {MANIFEST_FILE, "report.txt", "report.png"}
    assert {p.name for p in digits_ladder.out.iterdir()} == expected
    assert [p.name for p in digits_ladder.out.parent.iterdir()] == ["digits"]


def test_every_rung_keeps_signature(digits_ladder: LadderResult) -> None:
    """onnxruntime loads every rung with the original's signature."""
    manifest = read_manifest(digits_ladder.out / MANIFEST_FILE)
    signatures = {load_model(digits_ladder.out / v.file).signature for v in manifest.variants}
    assert len(signatures) == 1


def test_rungs_are_within_budget_and_cheaper(digits_ladder: LadderResult) -> None:
    """Each rung keeps accuracy within a point and is cheaper in some way than the one above."""
    variants = read_manifest(digits_ladder.out / MANIFEST_FILE).variants
    reference = variants[0].metrics.accuracy
    assert reference is not None
    for above, below in itertools.pairwise(variants):
        assert below.metrics.accuracy is not None
        assert reference - below.metrics.accuracy <= 0.01 + 1e-9
        a, b = above.metrics.model_dump(), below.metrics.model_dump()
        assert (
            b["latency_ms"] < a["latency_ms"]
            or b["batch_latency_ms"] < a["batch_latency_ms"]
            or below.size_bytes < above.size_bytes
            or b["peak_rss_mb"] < a["peak_rss_mb"]
        )


def test_every_candidate_is_accounted_for(digits_ladder: LadderResult) -> None:
    """The report lists each candidate tried with a decision, kept or why not."""
    names = {d.name for d in digits_ladder.decisions}
    assert {"fp32", "int8-dynamic", "int8-minmax", "pruned50", "pruned50-int8"} <= names
    assert all(d.reason for d in digits_ladder.decisions)
    for decision in digits_ladder.decisions:
        assert decision.name in digits_ladder.report


def test_tight_budget_drops_lossy_variants(
    tmp_path: Path, digits_gemm: Path, digits_calib: Path, digits_eval: Path
) -> None:
    """With a zero budget every kept rung matches the original's accuracy."""
    settings = replace(QUICK, budget=Budget(0.0), mixed=False)
    result = build_ladder(
        digits_gemm, tmp_path / "d", calib=digits_calib, evaluation=digits_eval, settings=settings
    )
    reference = result.manifest.variants[0].metrics.accuracy
    assert all(v.metrics.accuracy == reference for v in result.manifest.variants)
    assert any(d.reason.startswith("over budget") for d in result.decisions)


def test_cnn_ladder_uses_fidelity(
    tmp_path: Path, cnn: Path, cnn_calib: Path, cnn_eval: Path
) -> None:
    """Without labels the manifest records cosine, and of the static int8 variants only the
    best calibrator of each weight granularity (per channel, per tensor) is timed."""
    recipe = Recipe(prune_ratios=(0.5,), calibrations=(Calibration.MINMAX, Calibration.PERCENTILE))
    settings = replace(QUICK, recipe=recipe)
    result = build_ladder(
        cnn, tmp_path / "cnn", calib=cnn_calib, evaluation=cnn_eval, settings=settings
    )
    variants = result.manifest.variants
    assert all(v.metrics.accuracy is None for v in variants)
    assert all(v.metrics.fidelity is not None and v.metrics.fidelity >= 0.99 for v in variants)
    tried = {d.name for d in result.decisions}
    assert {"int8-minmax", "int8-percentile", "int8-minmax-tensor", "pruned50", "fp16"} <= tried
    twins = [d for d in result.decisions if d.reason.startswith("duplicate: same graph as int8-")]
    assert sorted(t.name.endswith("-tensor") for t in twins) == [False, True]
    assert all(t.name not in result.evaluations for t in twins)  # never timed
    timed = {n for n in result.evaluations if n.startswith("int8-")}
    assert len(timed) == 2 and sum(n.endswith("-tensor") for n in timed) == 1
    assert "int8-dynamic" not in tried  # the dense head holds too few of the weights


def test_existing_output_is_refused(tmp_path: Path, digits_gemm: Path, digits_calib: Path) -> None:
    """An existing --out is refused before any work, and its contents stay untouched."""
    out = tmp_path / "digits"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        build_ladder(digits_gemm, out, calib=digits_calib, evaluation=None, settings=QUICK)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_replaces_output(
    tmp_path: Path, digits_gemm: Path, digits_calib: Path, digits_eval: Path
) -> None:
    """With force the old folder is replaced whole: its stray files are gone."""
    out = tmp_path / "digits"
    out.mkdir()
    (out / "stale.onnx").write_text("old")
    build_ladder(
        digits_gemm, out, calib=digits_calib, evaluation=digits_eval, settings=QUICK, force=True
    )
    assert not (out / "stale.onnx").exists()
    assert (out / MANIFEST_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]


def test_no_data_is_refused(tmp_path: Path, digits_gemm: Path) -> None:
    """The ladder needs calibration or evaluation data and says so."""
    with pytest.raises(DataError, match="--calib"):
        build_ladder(digits_gemm, tmp_path / "d", calib=None, evaluation=None, settings=QUICK)
    assert not (tmp_path / "d").exists()


def test_subgraph_only_model_is_refused(tmp_path: Path, if_model: Path, vector16: Path) -> None:
    """A model whose weights all sit in If branches is refused, and no folder appears."""
    with pytest.raises(UnsupportedModelError, match="subgraphs"):
        build_ladder(if_model, tmp_path / "m", calib=vector16, evaluation=None, settings=QUICK)
    assert list(tmp_path.iterdir()) == []


def test_weightless_model_is_refused(tmp_path: Path, vector16: Path) -> None:
    """A graph without MatMul, Gemm or Conv weights has nothing to compress and says so."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])],
        "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [-1, 16])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UnsupportedModelError, match=r"nothing to compress.*Relu"):
        build_ladder(path, tmp_path / "m", calib=vector16, evaluation=None, settings=QUICK)
    assert not (tmp_path / "m").exists()


def test_mismatched_data_is_refused(tmp_path: Path, digits_gemm: Path, cnn_calib: Path) -> None:
    """Images offered to the digits model are refused with the shapes involved."""
    with pytest.raises(DataError, match="shape"):
        build_ladder(digits_gemm, tmp_path / "d", calib=cnn_calib, evaluation=None, settings=QUICK)


def test_candidates_are_deterministic(
    tmp_path: Path, digits_gemm: Path, digits_calib: Path
) -> None:
    """Building the candidates twice with the same seed gives byte-identical files."""
    model = load_model(digits_gemm)
    calib = load_dataset(digits_calib, model.signature)
    digests: list[dict[str, str]] = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        built: dict[str, Path] = {}
        for candidate in plan(model, calib, QUICK_RECIPE):
            source = load_model(built[candidate.base]) if candidate.base else model
            built[candidate.name] = candidate.build(source, folder / f"{candidate.name}.onnx").path
        digests.append({name: sha256_of(path) for name, path in built.items()})
    assert digests[0] == digests[1]
    assert any(name.startswith("distilled") for name in digests[0])


def test_mixed_precision_rescues_int8(tmp_path: Path, outlier_mlp: Path, vector16: Path) -> None:
    """When all-int8 misses the budget, the ladder searches for and keeps a mixed rung."""
    recipe = Recipe(
        prune_ratios=(),
        calibrations=(Calibration.MINMAX,),
        student_shares=(),
        int4=False,
        fp16=False,
    )
    settings = replace(QUICK, recipe=recipe)
    result = build_ladder(
        outlier_mlp, tmp_path / "m", calib=vector16, evaluation=None, settings=settings
    )
    reasons = {d.name: d.reason for d in result.decisions}
    assert reasons["int8-minmax"].startswith("over budget")
    assert "int8-mixed" in reasons
    assert "int8-mixed" in result.evaluations
    assert result.evaluations["int8-mixed"].fidelity.cosine >= 0.99
    # Smaller on disk is no rung any more: it stays only if it is a step cheaper to run.
    kept = [v.name for v in result.manifest.variants]
    assert kept[0] == "fp32"
    assert "int8-mixed" in kept or reasons["int8-mixed"].startswith("no step")


def test_conv_net_plans_students_and_per_tensor_int8(
    residual_cnn: Path, residual_calib: Path
) -> None:
    """With fine-tuning asked for, a conv net's plan has narrower students (fp32 and int8)
    beside the fine-tuned pruned variants, and static int8 both per channel and per tensor."""
    model = load_model(residual_cnn)
    recipe = Recipe(prune_ratios=(0.5,), calibrations=(Calibration.MINMAX,), finetune=True)
    names = {c.name for c in plan(model, load_dataset(residual_calib, model.signature), recipe)}
    assert {"student50", "student50-int8", "student25", "student25-int8"} <= names
    assert {"pruned50", "pruned50-int8", "int8-minmax", "int8-minmax-tensor"} <= names
