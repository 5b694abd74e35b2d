"""The ladder's report for people: a table for the terminal and a plot of quality vs cost."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from compressor.evaluate import Evaluation, Quality
from compressor.selection import Decision

COLUMNS = (
    "variant", "status", "size KB", "size x", "b1 ms", "b1 x", "bN ms", "bN x",
    "accuracy", "cosine", "top1 agr", "IoU", "RSS MB",
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
    """A PNG with one panel per cost (batch-1 latency, batch latency, peak memory): quality
    against the cost as a ratio to the original, the kept ladder joined as a Pareto front.

    Points are numbered, not named, and a key beside the panels names them, so that labels
    of variants with nearly equal figures cannot overlap.
    """
    import matplotlib  # noqa: PLC0415 -- a heavy import only the report needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 -- must follow the backend choice
    from matplotlib import ticker  # noqa: PLC0415

    ref = evaluations[reference]
    names = [*kept, *sorted(n for n in evaluations if n not in kept)]
    number = {name: i + 1 for i, name in enumerate(names)}
    costs: list[tuple[str, Callable[[Evaluation], float | None]]] = [
        ("latency at batch 1", lambda e: e.latency.batch1_ms),
        (f"latency at batch {ref.latency.batch_size}", lambda e: e.latency.batch_ms),
        ("peak memory", lambda e: e.peak_rss_mb),
    ]
    panels = [(title, get) for title, get in costs if get(ref)]
    figure, axes = plt.subplots(
        1, len(panels) + 1, figsize=(4.2 * len(panels) + 3.6, 4.4),
        gridspec_kw={"width_ratios": [4.2] * len(panels) + [3.6]},
    )  # fmt: skip
    label = "accuracy" if ref.accuracy is not None else "cosine to original"
    for axis, (title, get) in zip(axes[:-1], panels, strict=True):
        base = get(ref) or 1.0
        front = [(get(evaluations[n]) or 0.0) / base for n in kept]
        axis.step(front, [evaluations[n].quality for n in kept], where="post", c="tab:blue",
                  alpha=0.4, zorder=1)  # fmt: skip
        for name in names:
            value = get(evaluations[name])
            if value is None:
                continue
            e = evaluations[name]
            is_kept = name in kept
            colour = "tab:blue" if is_kept else "silver"
            axis.scatter([value / base], [e.quality], s=70 if is_kept else 45,
                         zorder=5 if is_kept else 3, c=colour)  # fmt: skip
            axis.annotate(str(number[name]), (value / base, e.quality), fontsize=7,
                          zorder=6 if is_kept else 4,
                          xytext=(0, 0), textcoords="offset points", ha="center",
                          va="center", color="white" if is_kept else "black")  # fmt: skip
        axis.set_xscale("log")  # ratios from 0.05x to 1.5x: equal steps look equal
        axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_xlabel(f"{title} (x {reference}, log scale)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    key = axes[-1]
    key.axis("off")
    lines = []
    for name in names:
        e = evaluations[name]
        mark = "*" if name in kept else " "
        lines.append(
            f"{number[name]:>2} {mark} {name[:18]:<18} {e.quality:.4f} "
            f"{e.latency.batch1_ms / ref.latency.batch1_ms:5.2f}x"
        )
    key.text(0.0, 1.0, "\n".join(["    variant            quality  b1", *lines]),
             family="monospace", fontsize=7.5, va="top")  # fmt: skip
    figure.suptitle("edge-compress ladder: kept rungs (*) in blue, joined; dropped in grey")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _row(
    decision: Decision, quality: Quality | None, e: Evaluation | None, ref: Evaluation
) -> tuple[str, ...]:
    status = "kept" if decision.kept else decision.reason.split(":")[0]
    acc = cos = agree = iou = "-"
    if quality is not None:
        acc = "-" if quality.accuracy is None else f"{quality.accuracy:.4f}"
        cos = f"{quality.fidelity.cosine:.5f}"
        agree = (
            "-"
            if quality.fidelity.top1_agreement is None
            else (f"{quality.fidelity.top1_agreement:.3f}")
        )
        # A map's IoU, or a detector's boxes' (a model has one kind of output or the other).
        overlap = quality.fidelity.map_iou
        overlap = quality.fidelity.box_iou if overlap is None else overlap
        iou = "-" if overlap is None else f"{overlap:.4f}"
    if e is None:
        return (decision.name, status, "-", "-", "-", "-", "-", "-", acc, cos, agree, iou, "-")
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
        iou,
        "-" if e.peak_rss_mb is None else f"{e.peak_rss_mb:.1f}",
    )
