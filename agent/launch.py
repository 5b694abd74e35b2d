"""The `edge-agent` command's first step: shape how the libraries import, then run the CLI.

Some libraries decide at import time what to pull in from whatever happens to be installed:
structlog imports rich (a traceback renderer with pygments behind it), better-exceptions,
colorama, greenlet and twisted when it finds them, and pydantic reads the entry points of
every installed distribution for plugins when the first model class is built. On a
workstation with a full environment that was 5 MB of memory and a quarter of the start-up
time, for nothing the agent uses. Others import at the top what only a few of their
functions use: structlog imports asyncio (with ssl behind it) for its async logging
methods, and pydantic's plugin loader imports importlib.metadata (with email and zipfile)
even when plugins are disabled; each stands in the way of a first answer for 10-20 ms, for
nothing the agent calls. This runs before any of them is imported.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import types
from typing import Any

# What structlog imports when present and the agent never uses: it renders with its plain
# console and JSON renderers (agent/logs.py), and runs on threads, not greenlets or Twisted.
STRUCTLOG_EXTRAS = ("rich", "better_exceptions", "colorama", "greenlet", "twisted")
# Imported on first use instead: structlog's async methods, the only users, are never called.
DEFERRED_PACKAGES = ("asyncio",)
# The values of PYDANTIC_DISABLE_PLUGINS with which pydantic looks for no plugin at all.
_NO_PLUGINS = ("__all__", "1", "true")


def main() -> int:
    """The `edge-agent` command (and `python -m agent`)."""
    prepare_imports()
    from agent.cli import main as cli  # noqa: PLC0415  (must follow prepare_imports)

    return cli()


def prepare_imports() -> None:
    """Import structlog without its optional extras, keep pydantic from scanning for
    plugins and numpy's OpenBLAS from starting threads; a user's own settings of
    PYDANTIC_DISABLE_PLUGINS and OPENBLAS_NUM_THREADS are kept."""
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    # Read once, when numpy loads OpenBLAS: 50 ms of CPU and a buffer per thread otherwise.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    for name in DEFERRED_PACKAGES:
        defer_import(name, package=True)
    if os.environ["PYDANTIC_DISABLE_PLUGINS"] in _NO_PLUGINS:
        # What pydantic.plugin._loader.get_plugins returns then, without its import.
        defer_import("pydantic.plugin._loader", get_plugins=tuple)
    import_without("structlog", STRUCTLOG_EXTRAS)


def defer_import(name: str, *, package: bool = False, **known: Any) -> None:
    """Have `import name` give a stand-in that imports the real module when one of its
    attributes is first read (then reads that attribute of it), except the `known` ones,
    which it answers itself. Nothing happens when the module is imported already.

    Unlike importlib.util.LazyLoader's modules, the stand-in is not loaded by the import
    statement itself (Python 3.11 reads `__spec__` of what it finds in sys.modules). Only
    a `package` has a `__path__`: `from name import x` asks for one, and a plain module
    that answered would be taken for a package.
    """
    if name in sys.modules:
        return
    stand_in = types.ModuleType(name, f"{name}, imported on first use (agent/launch.py)")
    lock = threading.Lock()

    def load(attribute: str) -> Any:
        if attribute == "__path__" and not package:
            raise AttributeError(attribute)
        with lock:
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
            module = importlib.import_module(name)
        return getattr(module, attribute)

    vars(stand_in).update(known, __getattr__=load)
    sys.modules[name] = stand_in


def import_without(module: str, hidden: tuple[str, ...]) -> None:
    """Import `module` as if the `hidden` packages were not installed; they stay importable
    afterwards for anyone who asks for them by name.

    A None entry in sys.modules makes `import name` raise ImportError, which is how these
    libraries detect an optional package that is missing. Packages already imported are
    left as they are (and `module` then sees them, as it would have anyway).
    """
    masked = [name for name in hidden if name not in sys.modules]
    for name in masked:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "absent"
    try:
        importlib.import_module(module)
    finally:
        for name in masked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
