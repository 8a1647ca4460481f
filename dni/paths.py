"""Where dni keeps its caches (imports nothing heavy: the entry point uses it before torch)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Per-user cache directory of dni: ``DNI_CACHE_DIR``, else ``$XDG_CACHE_HOME/dni`` or
    ``~/.cache/dni``."""
    if env := os.environ.get("DNI_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dni"
