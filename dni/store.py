"""The checkpoint store: one directory holding every trained model and its evaluations.

Layout::

    <store>/models/<model_id>/spec.json            TrainSpec (canonical JSON)
    <store>/models/<model_id>/weights.safetensors  tensors only: never a pickle
    <store>/models/<model_id>/meta.json            provenance, training curve, sha256 of the weights
    <store>/models/<model_id>/evals/<protocol>.csv evaluation cells, one row per (sigma_val, repeat)

A model directory is written under a temporary name and renamed into place, and every
file is written to a temporary file and renamed, so a crash never leaves a half-written
checkpoint or CSV. Writers of the same file are serialised with ``fcntl`` locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dni.data import input_shape
from dni.errors import SpecError, StoreError
from dni.models import NoisyRecurrent, build_model
from dni.spec import TrainSpec, check_id


_FAULT_COUNT = 0


def _fault_point(stage: str) -> None:
    """Crash-test hook: ``DNI_FAULT_KILL=<stage>:<n>`` SIGKILLs this process at the n-th
    atomic write reaching ``stage`` (``mid-write``: half the bytes are on disk;
    ``before-rename``: the temporary file is complete). Used by the fault-injection tests."""
    global _FAULT_COUNT
    spec = os.environ.get("DNI_FAULT_KILL")
    if not spec or not spec.startswith(stage + ":"):
        return
    _FAULT_COUNT += 1
    if _FAULT_COUNT == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


_HOST = socket.gethostname().replace(".", "_") or "host"
_STALE_FOREIGN_S = 24 * 3600  # temporaries of another host are removed only when this old


def tmp_prefix(name: str) -> str:
    """Prefix of a temporary file or directory: it names its writer (host, pid) so that a
    crashed writer's leftovers can be told from a live writer's work in progress."""
    return f".{name}.{_HOST}.{os.getpid()}."


def _is_stale(path: Path) -> bool:
    parts = path.name.split(".")
    try:
        host, pid = parts[-4], int(parts[-3])
    except (IndexError, ValueError):
        return False
    if host != _HOST:
        try:
            return time.time() - path.lstat().st_mtime > _STALE_FOREIGN_S
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete the temporary files and directories that crashed writers left under ``root``."""
    removed = []
    if not root.is_dir():
        return removed
    for path in list(root.rglob(".*.tmp")):
        if _is_stale(path):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
    return removed


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    Raises:
        StoreError: the file cannot be written (read-only or full file system, ...); the
            old file, if any, is unchanged and no temporary file is left behind.
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix(path.name), suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            _fault_point("mid-write")
            fh.write(data[len(data) // 2 :])
            fh.flush()
            os.fsync(fh.fileno())
        _fault_point("before-rename")
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed), released on exit or crash."""
    try:
        fh = open(path, "a")
    except OSError as exc:
        raise StoreError(f"cannot lock {path}: {exc.strerror or exc}") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class StoredModel:
    """A model loaded from the store."""

    model_id: str
    spec: TrainSpec
    model: NoisyRecurrent
    meta: dict[str, Any]


class Store:
    """A checkpoint store rooted at a directory (created on first write)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {self.root} exists and is not a directory")

    # ------------------------------------------------------------------ paths

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model_dir(self, model_id: str) -> Path:
        return self.models_dir / check_id(model_id)

    def clean(self) -> list[Path]:
        """Remove what crashed writers left behind (temporary files of dead processes)."""
        return remove_stale_temporaries(self.root)

    def writable_dir(self, path: Path) -> Path:
        """Create ``path`` (inside the store) if needed; a clear StoreError if it cannot be written."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot write to store {self.root}: {exc.strerror or exc}") from None
        return path

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Serialise work on ``name`` (e.g. a model id) across processes."""
        locks = self.writable_dir(self.root / "locks")
        with file_lock(locks / f"{check_id(name)}.lock"):
            yield

    # ------------------------------------------------------------------ models

    def has_model(self, model_id: str) -> bool:
        return (self.model_dir(model_id) / "meta.json").is_file()

    def model_ids(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir() if not p.name.startswith(".") and (p / "meta.json").is_file())

    def resolve(self, ref: str) -> str:
        """Full model id from an id or a unique prefix of one."""
        if self.has_model(ref):
            return ref
        matches = [m for m in self.model_ids() if m.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise StoreError(f"no model {ref!r} in store {self.root}")
        raise StoreError(f"model reference {ref!r} is ambiguous: {', '.join(matches[:5])}")

    def save_model(self, spec: TrainSpec, model: NoisyRecurrent, meta: dict[str, Any], overwrite: bool = False) -> str:
        """Save weights, spec and provenance atomically; return the model id."""
        model_id = spec.model_id
        dest = self.model_dir(model_id)
        if dest.exists() and not overwrite:
            raise StoreError(f"model {model_id} is already in the store")
        parent = self.writable_dir(self.models_dir)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        weights = st_save(tensors, metadata={"model_id": model_id})
        meta = {**meta, "model_id": model_id, "weights_sha256": hashlib.sha256(weights).hexdigest()}
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=tmp_prefix(model_id), suffix=".tmp"))
        try:
            for name, data in (
                ("weights.safetensors", weights),
                ("spec.json", json.dumps(spec.to_dict(), indent=2, sort_keys=True).encode()),
                ("meta.json", json.dumps(meta, indent=2, sort_keys=True).encode()),
            ):
                atomic_write(tmp / name, data)
            if dest.exists():  # --force: keep the old model until the new one is complete
                old = dest.with_name(f"{tmp_prefix(model_id)}old.tmp")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        except (OSError, StoreError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StoreError(f"cannot write model {model_id} to {self.root}: {reason}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return model_id

    def read_spec(self, model_id: str) -> TrainSpec:
        path = self.model_dir(model_id) / "spec.json"
        try:
            return TrainSpec.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise StoreError(f"no model {model_id!r} in store {self.root}") from None
        except (ValueError, TypeError, SpecError) as exc:
            raise StoreError(f"{path} is corrupted: {exc}") from None

    def read_meta(self, model_id: str) -> dict[str, Any]:
        path = self.model_dir(model_id) / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"no model {model_id!r} in store {self.root}") from None
        except ValueError as exc:
            raise StoreError(f"{path} is corrupted: {exc}") from None
        if not isinstance(meta, dict):
            raise StoreError(f"{path} is corrupted: not a JSON object")
        return meta

    def load_model(self, model_id: str, device: str | torch.device = "cpu") -> StoredModel:
        """Load a model, verifying its checksum, tensor names and shapes against its spec."""
        spec = self.read_spec(model_id)
        meta = self.read_meta(model_id)
        if spec.model_id != model_id:
            raise StoreError(f"model {model_id}: its spec.json describes a different model ({spec.model_id})")
        path = self.model_dir(model_id) / "weights.safetensors"
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from None
        if hashlib.sha256(raw).hexdigest() != meta.get("weights_sha256"):
            raise StoreError(f"{path} is corrupted (checksum mismatch)")
        try:
            tensors = st_load(raw)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise StoreError(f"{path} is corrupted: {exc}") from None
        model = build_model(spec.arch, input_shape(spec.data)[1], spec.hidden_size)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != got:
            raise StoreError(f"{path} does not match its spec: expected tensors {expected}, found {got}")
        model.load_state_dict(tensors)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise StoreError(f"model {model_id} has non-finite weights")
        return StoredModel(model_id, spec, model.to(device).eval(), meta)

    # ------------------------------------------------------------------ evaluation cells

    def eval_path(self, model_id: str, protocol_id: str) -> Path:
        return self.model_dir(model_id) / "evals" / f"{check_id(protocol_id)}.csv"

    def read_cells(self, model_id: str, protocol_id: str, columns: list[str]) -> pd.DataFrame:
        """Evaluation cells stored for a model under one protocol (empty if none)."""
        return read_csv(self.eval_path(model_id, protocol_id), columns)

    def add_cells(self, model_id: str, protocol_id: str, cells: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        """Merge new cells into the stored ones (existing keys win) and write atomically."""
        path = self.eval_path(model_id, protocol_id)
        self.writable_dir(path.parent)
        with file_lock(path.with_suffix(".lock")):
            old = read_csv(path, list(cells.columns))
            merged = pd.concat([old, cells], ignore_index=True) if len(old) else cells
            merged = merged.drop_duplicates(subset=keys, keep="first").sort_values(keys, kind="stable")
            write_csv(path, merged)
        return merged


def read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """Read a results CSV, checking that it has the expected columns."""
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not a readable CSV: {exc}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise StoreError(f"{path} lacks column(s) {', '.join(missing)}")
    return df


def write_csv(path: Path, df: pd.DataFrame) -> None:
    """Write a CSV atomically (pandas writes the shortest exact repr of each float)."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
    atomic_write(path, buf.getvalue().encode())
