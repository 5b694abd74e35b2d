"""Allow `python -m agent` as a synonym for the `edge-agent` command."""

from agent.launch import main

raise SystemExit(main())
