"""The exit codes of `supervisor` (fixed surface, docs/protocol.md): completed or early stopped 0, gave up 1,
usage or config error 2, paused 75 (EX_TEMPFAIL: run the same command again later)."""

EXIT_COMPLETED, EXIT_GAVE_UP, EXIT_USAGE, EXIT_PAUSED = 0, 1, 2, 75
