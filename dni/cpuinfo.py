"""The first processor's fields in /proc/cpuinfo (imports nothing heavy: the entry point
reads them before torch is imported)."""

from __future__ import annotations

from pathlib import Path


def first_processor(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """``field: value`` of the first processor block; empty where the file cannot be read."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields
