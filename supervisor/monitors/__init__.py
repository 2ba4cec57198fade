"""One small class per signal source the watchdog polls: events, output, memory, disk, files, clock."""
