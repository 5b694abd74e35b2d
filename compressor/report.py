"""The ladder's report for people: a table for the terminal and a plot of quality vs cost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from compressor.evaluate import Evaluation, Quality
from compressor.selection import Decision

COLUMNS = (
    "variant", "status", "size KB", "size x", "b1 ms", "b1 x", "bN ms", "bN x",
    "accuracy", "cosine", "top1 agr", "RSS MB",
)  # fmt: skip


def table(
    reference: str,
    evaluations: Mapping[str, Evaluation],
    scores: Mapping[str, Quality],
    decisions: Sequence[Decision],
) -> str:
    """A fixed-width table of every candidate, kept ones first, with each decision's reason."""
    ref = evaluations[reference]
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    ordered = [d for d in decisions if d.kept] + [d for d in decisions if not d.kept]
    for decision in ordered:
        quality = scores.get(decision.name)
        measured = evaluations.get(decision.name)
        rows.append(_row(decision, quality, measured, ref))
        notes.append(f"  {decision.name}: {decision.reason}")
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(COLUMNS, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                v.rjust(w) if i else v.ljust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    batch = ref.latency.batch_size
    legend = (
        f"b1/bN: p50 latency at batch 1 / batch {batch}; x: ratio to {reference}; "
        "RSS: peak memory added by load + one run"
    )
    return "\n".join([*lines, "", legend, "", *notes]) + "\n"


def plot(
    reference: str, evaluations: Mapping[str, Evaluation], kept: Sequence[str], path: Path
) -> Path:
    """A PNG of quality against batch latency and file size, ratios to the original."""
    import matplotlib  # noqa: PLC0415 -- a heavy import only the report needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 -- must follow the backend choice

    ref = evaluations[reference]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    label = "accuracy" if ref.accuracy is not None else "cosine to original"
    for name, e in evaluations.items():
        is_kept = name in kept
        colour, size = ("tab:blue", 50) if is_kept else ("lightgrey", 25)
        latency = (e.latency.batch_ms or e.latency.batch1_ms) / (
            ref.latency.batch_ms or ref.latency.batch1_ms
        )
        size_ratio = e.size_bytes / max(ref.size_bytes, 1)
        for axis, x in ((left, latency), (right, size_ratio)):
            axis.scatter([x], [e.quality], c=colour, s=size, zorder=3 if is_kept else 2)
            if is_kept:
                axis.annotate(
                    name, (x, e.quality), fontsize=8, xytext=(4, 4), textcoords="offset points"
                )
    left.set_xlabel(f"latency at batch {ref.latency.batch_size} (x {reference})")
    right.set_xlabel(f"file size (x {reference})")
    for axis in (left, right):
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    figure.suptitle("edge-compress ladder: kept rungs in blue, dropped in grey")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _row(
    decision: Decision, quality: Quality | None, e: Evaluation | None, ref: Evaluation
) -> tuple[str, ...]:
    status = "kept" if decision.kept else decision.reason.split(":")[0]
    acc = cos = agree = "-"
    if quality is not None:
        acc = "-" if quality.accuracy is None else f"{quality.accuracy:.4f}"
        cos = f"{quality.fidelity.cosine:.5f}"
        agree = (
            "-"
            if quality.fidelity.top1_agreement is None
            else (f"{quality.fidelity.top1_agreement:.3f}")
        )
    if e is None:
        return (decision.name, status, "-", "-", "-", "-", "-", "-", acc, cos, agree, "-")
    b1 = e.latency.batch1_ms
    bn = e.latency.batch_ms
    ref_bn = ref.latency.batch_ms
    return (
        decision.name,
        status,
        f"{e.size_bytes / 1024:.1f}",
        f"{e.size_bytes / max(ref.size_bytes, 1):.2f}",
        f"{b1:.3f}",
        f"{b1 / ref.latency.batch1_ms:.2f}",
        "-" if bn is None else f"{bn:.3f}",
        "-" if bn is None or ref_bn is None else f"{bn / ref_bn:.2f}",
        acc,
        cos,
        agree,
        "-" if e.peak_rss_mb is None else f"{e.peak_rss_mb:.1f}",
    )
