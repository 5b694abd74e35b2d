"""Swaps under load, as the swap tests of every runtime drive them: a client thread that
keeps submitting while the test swaps a model's variants back and forth."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from agent.models import ModelManager

FULL_QUEUE_RETRY_S = 0.001


def swap_under_load(
    manager: ModelManager,
    model: str,
    variants: Sequence[str],
    swaps: int,
    send: Callable[[int], None],
    pause_s: float,
    full_queue: type[Exception] | tuple[type[Exception], ...] = (),
) -> int:
    """Swap `model` `swaps` times, to `variants` in turn, while a client thread calls
    `send(n)` for its n-th request every `pause_s` seconds (and again a millisecond later
    when it raises `full_queue`); the number of requests sent once the swaps are done."""
    stop = threading.Event()
    sent = 0

    def client() -> None:
        nonlocal sent
        while not stop.is_set():
            try:
                send(sent)
            except full_queue:
                time.sleep(FULL_QUEUE_RETRY_S)
                continue
            sent += 1
            time.sleep(pause_s)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for i in range(swaps):
            manager.switch(model, variants[i % len(variants)], reason="test")
    finally:
        stop.set()
        thread.join(10)
    return sent
