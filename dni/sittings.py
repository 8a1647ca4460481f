"""A record of every sitting of a long run, kept as it goes.

A reproduction that takes hours is often run in several sittings: it is interrupted
(a terminal closes, a machine is rebooted, a job is killed) and resumed later, and the store
keeps what was done. Its wall time is then the sum over the sittings, and a sitting
killed by SIGKILL never reaches the end where a summary would be written.

So each sitting writes its own record, ``<results>/sittings/<started>-<pid>-<random>.json``, when it
starts, after each stage, and every ``heartbeat`` seconds from a daemon thread. A killed
sitting keeps a record whose ``seconds`` is at most one heartbeat short. Records are
written atomically: a reader sees the old record or the new one.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

from dni.store import atomic_write

FOLDER = "sittings"


class Sitting:
    """The record of one sitting; use as a context manager around the run."""

    def __init__(self, results: Path, info: dict, heartbeat: float = 30.0):
        self._t0 = time.perf_counter()
        now = time.time()
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        folder = Path(results) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{started.replace(':', '')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.record = {**info, "started": started, "started_unix": now, "seconds": 0.0, "finished": False,
                       "stages_seconds": {}}
        self._heartbeat = heartbeat
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="dni-sitting", daemon=True)

    def __enter__(self) -> Sitting:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        self.record["finished"] = exc_type is None
        if exc_type is not None:
            self.record["stopped_by"] = exc_type.__name__
        self._write()

    def stage(self, name: str, seconds: float) -> None:
        """Record a finished stage of the run."""
        self.record["stages_seconds"][name] = seconds
        self._write()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat):
            self._write()

    def _write(self) -> None:
        with self._lock:
            self.record["seconds"] = self.seconds
            self.record["last_written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            atomic_write(self.path, (json.dumps(self.record, indent=2) + "\n").encode())


def read_sittings(results: Path, **match: object) -> list[dict]:
    """The sittings recorded in ``results`` whose fields equal ``match`` (e.g. the same
    preset), oldest first; unreadable records are skipped."""
    records = []
    for path in sorted((Path(results) / FOLDER).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and all(record.get(k) == v for k, v in match.items()):
            records.append(record)
    return sorted(records, key=_start)


def _start(record: dict) -> float:
    value = record.get("started_unix")
    return float(value) if isinstance(value, (int, float)) else 0.0


def summary(records: list[dict]) -> dict:
    """Total wall time over the sittings, and a line per sitting, for provenance.

    ``sittings_cpus``: the kinds of CPU the sittings ran on (records from before they were
    kept count as None). A total over sittings on more than one kind of machine is no one
    machine's wall time.
    """
    return {
        "sittings": len(records),
        "all_sittings_seconds": sum(float(r.get("seconds", 0.0)) for r in records),
        "sittings_cpus": list(dict.fromkeys(r.get("cpu") for r in records)),
        "sittings_detail": [
            {k: r.get(k) for k in ("started", "seconds", "finished", "git_commit", "cpu", "mkl_path", "cpu_capability", "executor",
                                "stages_seconds")}
            for r in records
        ],
    }
