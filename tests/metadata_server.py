"""A cloud metadata service on 127.0.0.1 for the spot-notice tests and benchmarks: AWS IMDSv2 (a token
from PUT /latest/api/token, then `spot/instance-action`), GCP (`instance/preempted`) and Azure
(Scheduled Events). Nothing to report until `interrupt()`."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = b"token-123"


class FakeMetadata:
    def __init__(self) -> None:
        self.action: bytes | None = None  # the AWS instance-action body once interrupted
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802 - the IMDSv2 token
                self._send(200, TOKEN)

            def do_GET(self):  # noqa: N802
                if self.path.endswith("spot/instance-action"):
                    ok = self.headers.get("X-aws-ec2-metadata-token") == TOKEN.decode() and outer.action
                    self._send(200, outer.action) if ok else self._send(404, b"")
                elif self.path.endswith("instance/preempted"):
                    self._send(200, b"TRUE" if outer.action else b"FALSE")
                elif "scheduledevents" in self.path:
                    events = [{"EventType": "Preempt", "NotBefore": outer.not_before}] if outer.action else []
                    self._send(200, json.dumps({"Events": events}).encode())
                else:
                    self._send(200, b"{}")

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.not_before = ""
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def interrupt(self, in_s: float | None = None) -> float | None:
        """Announce the end of the machine `in_s` seconds from now (AWS `time`, Azure `NotBefore`), or with a
        stale time (None: a skewed clock, the window applies); returns the unix time announced."""
        at = None if in_s is None else time.time() + in_s
        stamp = "2020-01-01T00:00:00Z" if at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
        self.not_before = "" if at is None else time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(at))
        self.action = json.dumps({"action": "terminate", "time": stamp}).encode()
        return at

    def close(self) -> None:
        self.server.shutdown()
