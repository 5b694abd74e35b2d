"""Allow `python -m agent` as a synonym for the `edge-agent` command."""

from agent.cli import main

raise SystemExit(main())
