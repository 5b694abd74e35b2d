"""The `edge-agent` command's first step: shape how the libraries import, then run the CLI.

Some libraries decide at import time what to pull in from whatever happens to be installed:
structlog imports rich (a traceback renderer with pygments behind it), better-exceptions,
colorama, greenlet and twisted when it finds them, and pydantic reads the entry points of
every installed distribution for plugins when the first model class is built. On a
workstation with a full environment that was 5 MB of memory and a quarter of the start-up
time, for nothing the agent uses. This runs before any of them is imported.
"""

from __future__ import annotations

import importlib
import os
import sys

# What structlog imports when present and the agent never uses: it renders with its plain
# console and JSON renderers (agent/logs.py), and runs on threads, not greenlets or Twisted.
STRUCTLOG_EXTRAS = ("rich", "better_exceptions", "colorama", "greenlet", "twisted")


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
    import_without("structlog", STRUCTLOG_EXTRAS)


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
