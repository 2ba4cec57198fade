"""Tails an attempt's events.jsonl: returns the complete lines appended since the last poll."""

from __future__ import annotations

from pathlib import Path

from supervisor.protocol import Event, parse_event


class EventTail:
    """Incremental reader of an append-only JSON-lines file; a partial last line waits for its newline."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[Event]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        events = []
        for raw in lines:
            event = parse_event(raw.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events
