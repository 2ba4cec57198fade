"""Spot/preemptible interruption notices from the cloud's metadata service, polled in the background.

AWS (IMDSv2 `spot/instance-action`, ~2 min notice), GCP (`instance/preempted` = TRUE, 30 s) and
Azure (Scheduled Events `Preempt`, >= 30 s); facts and sources: docs/platforms.md ("Spot notices").
The watchdog only reads `notice()`; the poller never blocks it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from email.utils import parsedate_to_datetime

log = logging.getLogger("supervisor")

# The notice windows when the notice itself names no time (docs/platforms.md, "Spot notices").
WINDOW_S = {"aws": 120.0, "gcp": 30.0, "azure": 30.0}

DEFAULT_URLS = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}


def _get(url: str, headers: dict[str, str], timeout: float, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - fixed metadata urls
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _iso_time(value: object) -> float | None:
    """Unix time of an ISO 8601 stamp such as AWS's "2026-12-01T14:30:00Z"; None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _http_date(value: object) -> float | None:
    """Unix time of an HTTP date such as Azure's "Mon, 19 Sep 2016 18:29:47 GMT"; None if it is not one."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


# Each check returns (what the notice says, unix time the machine goes away or None) or None.
Found = tuple[str, float | None]


def check_aws(base: str, timeout: float) -> Found | None:
    status, token = _get(f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"}, timeout, "PUT")
    headers = {"X-aws-ec2-metadata-token": token} if status == 200 else {}
    status, body = _get(f"{base}/latest/meta-data/spot/instance-action", headers, timeout)
    if status == 200 and body.strip():
        try:
            action = json.loads(body)
        except ValueError:
            return "AWS spot interruption notice", None
        if not isinstance(action, dict):
            return "AWS spot interruption notice", None
        return f"AWS spot interruption: {action.get('action')} at {action.get('time')}", _iso_time(action.get("time"))
    return None


def check_gcp(base: str, timeout: float) -> Found | None:
    status, body = _get(f"{base}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"}, timeout)
    return ("GCP preemption (instance/preempted = TRUE)", None) if status == 200 and body.strip() == "TRUE" else None


def check_azure(base: str, timeout: float) -> Found | None:
    url = f"{base}/metadata/scheduledevents?api-version=2020-07-01"
    status, body = _get(url, {"Metadata": "true"}, timeout)
    if status != 200:
        return None
    try:
        events = json.loads(body).get("Events", [])
    except ValueError:
        return None
    for ev in events:
        if ev.get("EventType") == "Preempt":
            return f"Azure spot eviction (Preempt, not before {ev.get('NotBefore')})", _http_date(ev.get("NotBefore"))
    return None


CHECKS = {"aws": check_aws, "gcp": check_gcp, "azure": check_azure}

# How each cloud's metadata service proves it is there (AWS and Azure share 169.254.169.254).
PROBES = {
    "aws": ("/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, "PUT"),
    "gcp": ("/computeMetadata/v1/instance/id", {"Metadata-Flavor": "Google"}, "GET"),
    "azure": ("/metadata/instance?api-version=2021-02-01", {"Metadata": "true"}, "GET"),
}


class NoticePoller:
    """Polls one cloud's metadata service every `interval_s` in a daemon thread; `notice()` is the
    first interruption notice seen, or None, and `deadline` the unix time the machine goes away (the
    notice's own time, else when it was seen plus the cloud's window). With cloud="auto" it tries each
    cloud once and keeps the first whose metadata service answers; none answering ends the thread quietly."""

    def __init__(self, cloud: str, interval_s: float = 5.0, base_url: str | None = None, timeout_s: float = 1.0,
                 window_s: float | None = None):  # fmt: skip
        self.cloud = cloud
        self.window_s = window_s
        self.interval_s = interval_s
        self.base_url = base_url
        self.timeout_s = timeout_s
        self._notice: str | None = None
        self.deadline: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> NoticePoller:
        if self.cloud != "off":
            self._thread = threading.Thread(target=self._loop, name="notices", daemon=True)
            self._thread.start()
        return self

    def notice(self) -> str | None:
        return self._notice

    def close(self) -> None:
        self._stop.set()

    def _answers(self, cloud: str) -> bool:
        path, headers, method = PROBES[cloud]
        try:
            return _get((self.base_url or DEFAULT_URLS[cloud]) + path, headers, self.timeout_s, method)[0] == 200
        except (OSError, urllib.error.URLError):
            return False

    def _loop(self) -> None:
        clouds = list(CHECKS) if self.cloud == "auto" else [self.cloud]
        if self.cloud == "auto":
            clouds = [c for c in clouds if self._answers(c)][:1]
            if not clouds:
                return
            log.info("watching %s interruption notices", clouds[0])
        cloud = clouds[0]
        base = self.base_url or DEFAULT_URLS[cloud]
        while not self._stop.is_set():
            try:
                found = CHECKS[cloud](base, self.timeout_s)
            except (OSError, urllib.error.URLError):
                found = None
            if found:
                text, at = found
                window = self.window_s or WINDOW_S[cloud]
                seen = time.time()
                # A stated time in the past or beyond the window is a skewed clock: trust the window.
                self.deadline = at if at is not None and seen < at <= seen + window + 5 else seen + window
                self._notice = text
                return
            self._stop.wait(self.interval_s)
