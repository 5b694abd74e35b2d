"""Memory that comes back (issue 7, item 6): a closed onnxruntime session's memory returns
to the system, so that many swaps of a CNN variant leave the agent where warm-up left it.

Real sessions of a CNN of about 8 MB of weights; RSS read as the agent reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.adapt.procstat import process_rss_mb, return_free_memory
from agent.config import ModelsConfig
from agent.models import ModelManager
from agent.repository import SupplyPolicy, scan
from agent.session import LoadedVariant, SessionSettings
from tests import onnx_models

SWAPS = 200
WARM_UP_SWAPS = 10
SETTINGS = SessionSettings(threads=1)


def rss() -> float:
    value = process_rss_mb()
    if value is None:
        pytest.skip("this system does not report the resident set (/proc/self/statm)")
    return value


@pytest.fixture(autouse=True)
def glibc() -> None:
    """The remedy is glibc's: elsewhere freed memory stays where the C library keeps it."""
    if not return_free_memory():
        pytest.skip("no glibc malloc_trim here: the C library decides when memory returns")


def cnn_ladder(root: Path) -> Path:
    """Two CNN variants of the same signature and size (different weights): a swap between
    them loads one and closes the other. No hashes, so that a load is not a checksum run."""
    build = root / "build"
    variants = [
        ("a", onnx_models.cnn_model(build / "a.onnx", seed=0)),
        ("b", onnx_models.cnn_model(build / "b.onnx", seed=1)),
    ]
    onnx_models.ladder_folder(
        root / "models" / "cnn", variants, hashes=False, **onnx_models.CNN_SIGNATURE
    )
    return root / "models"


def test_closing_a_variant_hands_what_it_held_back_to_the_system(tmp_path: Path) -> None:
    """Closing a loaded, warmed-up CNN variant gives back nearly all the resident memory
    that loading it added."""
    path = onnx_models.cnn_model(tmp_path / "cnn.onnx")
    # The first load touches the runtime's code and globals for good: not the variant's.
    LoadedVariant.load("cnn", "a", path, SETTINGS).close()
    before = rss()
    variant = LoadedVariant.load("cnn", "a", path, SETTINGS)
    assert variant.warmed_up
    loaded = rss()
    variant.close()
    after = rss()
    added = loaded - before
    # Without the remedy the first session's freed heap is kept and reused: nothing is
    # added, because nothing was given back.
    assert added > 8, f"loading added only {added:.1f} MB: the last close gave nothing back"
    assert after - before < max(3.0, 0.15 * added), (
        f"loading added {added:.1f} MB, closing left {after - before:.1f} MB of it"
    )


# About 8 s of CPU; on a shared, loaded machine the wall time can be many times that.
@pytest.mark.timeout(600)
def test_two_hundred_swaps_of_a_cnn_variant_leave_the_rss_where_warm_up_left_it(
    tmp_path: Path,
) -> None:
    """200 swaps between two CNN variants through the model manager (each one loads a
    session and closes the other) grow the resident set by less than 10 MB after the
    first 10, and every old variant is closed after its swap."""
    seen: list[tuple[str, dict[str, Any]]] = []
    manager = ModelManager(
        ModelsConfig(dir=cnn_ladder(tmp_path)),
        SETTINGS,
        lambda event, **fields: seen.append((event, fields)),
    )
    manager.drain_timeout_s = 5.0
    manager.supply_policy = SupplyPolicy(require_sha256=False)
    sources, rejected = scan(manager.models_dir, manager.supply_policy)
    assert not rejected
    manager.load_all(sources)
    try:
        warm = 0.0
        previous = manager.get("cnn").active
        for swap in range(1, SWAPS + 1):
            served = manager.switch("cnn", "b" if swap % 2 else "a", "pinned")
            assert previous is not None and previous.closed
            previous = served.active
            if swap == WARM_UP_SWAPS:
                warm = rss()
        grown = rss() - warm
    finally:
        manager.close(5)
    swaps = [fields for event, fields in seen if event == "variant_swapped"]
    assert len(swaps) == SWAPS
    assert {fields["mode"] for fields in swaps} == {"make-before-break"}
    measured = manager.measured_mb("cnn", "a")
    # Each load really took memory: about the 8 MB of weights (the heap is trimmed around it).
    assert measured is not None and measured > 6
    assert grown < 10.0, f"RSS grew {grown:.1f} MB over {SWAPS - WARM_UP_SWAPS} swaps"
