"""MNIST as image rows and as pen-stroke sequences: locate, download, verify, decode, cache.

Two views of the same 70,000 digits feed the paper's experiments:

* ``rows`` (Table I/III): each 28x28 image is a 28-step sequence of 28 pixel rows, scaled
  from 0..255 to [0, 1].
* ``strokes`` (Table II): de Jong's pen-stroke sequences; the first 50 pen points, 2 inputs
  per step, zero-padded when shorter. Two representations (``StrokeRepr``):
  ``absolute`` (default) feeds the pen's absolute (x, y) position, the cumulative sum of
  the (dx, dy) moves; positions run from 1 to 28 in the release, so they are divided by 28
  to lie in (0, 1] like the pixel inputs, and the zero padding stays distinct from every
  real position; ``offsets`` feeds the raw (dx, dy) moves in pixels (the first row
  is the start position). The paper speaks of "2-D coordinates", hence the default.
  Padded steps are (0, 0) in both.

Files live in a data directory with the layout ``mnist/<idx files>`` and
``mnist-strokes/<tar.gz files>``. The directory comes from ``--data-dir``, else the
``DNI_DATA_DIR`` environment variable, else ``<cache>/data``. Missing files are downloaded
from their public sources when the machine is online; every file's uncompressed content
is checked against its published md5 before it is used. Decoded arrays are cached as
``.npy`` files in ``<cache>/decoded`` (``DNI_CACHE_DIR``, else ``$XDG_CACHE_HOME/dni``,
else ``~/.cache/dni``) so that later loads take a fraction of a second.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dni.errors import DataError, SpecError
from dni.paths import cache_dir

DATASETS = ("rows", "strokes")
STROKE_REPRS = ("absolute", "offsets")
STROKE_STEPS = 50  # Table II: the first 50 pen points
STROKE_SCALE = 28.0  # absolute positions 1..28 -> (0, 1]
SPLITS = ("train", "test")


@dataclass(frozen=True)
class SourceFile:
    """One published data file: where it lives locally and online, and its checksum."""

    relpath: str  # inside the data directory
    urls: tuple[str, ...]
    md5: str  # of the uncompressed content (the published value)
    member: str | None = None  # file inside a .tar.gz, if any

    def read_bytes(self, path: Path) -> bytes:
        """Uncompressed content of the file at ``path``."""
        if self.member is None:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        with tarfile.open(path, "r:gz") as tar:
            fh = tar.extractfile(self.member)
            if fh is None:
                raise DataError(f"{path}: archive has no file {self.member}")
            return fh.read()


_MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/")
_STROKES_URL = "https://raw.githubusercontent.com/edwin-de-jong/mnist-digits-stroke-sequence-data/master/numpy-encoded/"


def _mnist(name: str, md5: str) -> SourceFile:
    return SourceFile(f"mnist/{name}", tuple(u + name for u in _MNIST_URLS), md5)


def _strokes(name: str, md5: str) -> SourceFile:
    return SourceFile(f"mnist-strokes/{name}.tar.gz", (_STROKES_URL + f"{name}.tar.gz",), md5, member=f"{name}.npy")


SOURCES: dict[tuple[str, str], dict[str, SourceFile]] = {
    ("rows", "train"): {
        "images": _mnist("train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb"),
        "labels": _mnist("train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624"),
    },
    ("rows", "test"): {
        "images": _mnist("t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea"),
        "labels": _mnist("t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637"),
    },
    # The release's test-padded-trailing file is a copy of the *training* array (a known
    # defect), so the test sequences are read from the leading-padded file instead.
    ("strokes", "train"): {
        "points": _strokes("train-padded-trailing", "cb2040ce8937743ac93b1241c54d4459"),
        "labels": _strokes("train-labels", "82785aff0c00f01dcd52a220e34edd80"),
    },
    ("strokes", "test"): {
        "points": _strokes("test-padded-leading", "27a10affe1328b7a2fed830a9e7e2771"),
        "labels": _strokes("test-labels", "5ef93c3cc4acaa730f36226e95deb2ab"),
    },
}
_DECODE_VERSION = 1


# --------------------------------------------------------------------------- locations


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: the argument, else ``DNI_DATA_DIR``, else ``<cache>/data``."""
    if data_dir is not None:
        return Path(data_dir)
    if env := os.environ.get("DNI_DATA_DIR"):
        return Path(env)
    return cache_dir() / "data"


# --------------------------------------------------------------------------- parsing


def parse_idx(raw: bytes) -> np.ndarray:
    """Decode an IDX file (big-endian header, uint8 payload) into an array."""
    if len(raw) < 8:
        raise DataError("IDX file is truncated (no header)")
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned byte data
        raise DataError(f"not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"IDX file has {len(raw) - offset} data bytes, header promises {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def parse_npy(raw: bytes) -> np.ndarray:
    """Decode a ``.npy`` payload without ever unpickling objects."""
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"not a valid .npy array: {exc}") from None


def read_stroke_text(path: str | Path) -> np.ndarray:
    """Read one digit in the per-digit text format (``trainimg-N-inputdata.txt``).

    Returns an int array of shape (points, 4) with columns dx, dy, eos, eod.
    """
    try:
        arr = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read stroke text file {path}: {exc}") from None
    if arr.shape[1] != 4:
        raise DataError(f"{path}: expected 4 columns (dx dy eos eod), got {arr.shape[1]}")
    return arr


def strip_padding(points: np.ndarray, leading: bool) -> tuple[np.ndarray, np.ndarray]:
    """Left-align padded stroke sequences and return them with their lengths.

    Args:
        points: (N, L, 4) sequences, zero rows before (``leading``) or after them.
        leading: True for the leading-padded release (the test set).

    Returns:
        (aligned, lengths): int8 (N, L, 4) left-aligned, zero after each sequence; int16 (N,).
    """
    nonzero = np.any(points != 0, axis=2)  # (N, L)
    if leading:
        # The first non-zero row starts the sequence (the start position is never (0, 0)).
        first = np.argmax(nonzero, axis=1)
        lengths = points.shape[1] - first
        idx = (np.arange(points.shape[1])[None, :] + first[:, None]) % points.shape[1]
        aligned = np.take_along_axis(points, idx[:, :, None], axis=1)
        aligned[np.arange(points.shape[1])[None, :] >= lengths[:, None]] = 0
    else:
        # The row with eod = 1 ends the sequence.
        eod = points[:, :, 3] == 1
        if not eod.any(axis=1).all():
            raise DataError("stroke data: a sequence has no end-of-digit row")
        lengths = np.argmax(eod, axis=1) + 1
        aligned = points.copy()
    if not (nonzero.sum(axis=1) <= lengths).all():
        raise DataError("stroke data: padding rows are not all zero")
    if np.abs(aligned).max() > 127:
        raise DataError("stroke data: offsets outside the int8 range")
    return aligned.astype(np.int8), lengths.astype(np.int16)


def stroke_inputs(aligned: np.ndarray, lengths: np.ndarray, repr: str = "absolute", steps: int = STROKE_STEPS) -> np.ndarray:
    """Network inputs for stroke sequences: (N, steps, 2) float32, zero-padded.

    Args:
        aligned: left-aligned (N, L, 4) sequences from :func:`strip_padding`.
        lengths: points per sequence.
        repr: ``absolute`` (positions / 28) or ``offsets`` (raw dx, dy).
        steps: number of pen points kept (50 in Table II).
    """
    if repr not in STROKE_REPRS:
        raise SpecError(f"unknown stroke representation {repr!r}; choose one of {', '.join(STROKE_REPRS)}")
    moves = aligned[:, :, :2].astype(np.float32)
    values = np.cumsum(moves, axis=1) / STROKE_SCALE if repr == "absolute" else moves
    out = np.zeros((aligned.shape[0], steps, 2), dtype=np.float32)
    n = min(steps, aligned.shape[1])
    out[:, :n] = values[:, :n]
    out[np.arange(steps)[None, :] >= lengths[:, None]] = 0.0
    return out


# --------------------------------------------------------------------------- files


def _md5(raw: bytes) -> str:
    return hashlib.md5(raw, usedforsecurity=False).hexdigest()


def _download(src: SourceFile, dest: Path) -> None:
    """Download ``src`` to ``dest``, verifying its checksum before it appears there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in src.urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                shutil.copyfileobj(resp, out)
            got = _md5(src.read_bytes(Path(tmp)))
            if got != src.md5:
                raise DataError(f"checksum mismatch for {url}: md5 {got}, expected {src.md5}")
            os.replace(tmp, dest)
            return
        except (urllib.error.URLError, OSError, tarfile.TarError, EOFError, DataError) as exc:
            errors.append(f"{url}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise DataError("; ".join(errors))


def _ensure(data_dir: Path, files: dict[str, SourceFile], download: bool) -> None:
    missing = [src for src in files.values() if not (data_dir / src.relpath).is_file()]
    if not missing:
        return
    if download:
        failures = []
        for src in missing:
            try:
                _download(src, data_dir / src.relpath)
            except DataError as exc:
                failures.append(str(exc))
        if not failures:
            return
        reason = f" (download failed: {failures[0]})"
    else:
        reason = ""
    names = ", ".join(str(data_dir / src.relpath) for src in missing)
    raise DataError(
        f"missing data file(s): {names}{reason}. Put the published files there "
        "(layout: mnist/*.gz, mnist-strokes/*.tar.gz) or point --data-dir / DNI_DATA_DIR at a copy."
    )


def _decode(data: str, split: str, data_dir: Path) -> dict[str, np.ndarray]:
    """Read, verify and decode one split from the published files."""
    arrays = {}
    for key, src in SOURCES[(data, split)].items():
        path = data_dir / src.relpath
        try:
            raw = src.read_bytes(path)
        except (OSError, EOFError, tarfile.TarError, gzip.BadGzipFile) as exc:
            raise DataError(f"{path} is unreadable or truncated ({exc}); delete it to download it again") from None
        got = _md5(raw)
        if got != src.md5:
            raise DataError(f"{path}: md5 of its content is {got}, expected {src.md5}; the file is corrupted or not the published one")
        arrays[key] = parse_idx(raw) if src.member is None else parse_npy(raw)
    labels = arrays["labels"].astype(np.int64)
    if data == "rows":
        return {"images": np.ascontiguousarray(arrays["images"]), "labels": labels}
    aligned, lengths = strip_padding(arrays["points"], leading=(split == "test"))
    return {"points": aligned, "lengths": lengths, "labels": labels}


def _cache_key(data: str, split: str, data_dir: Path) -> str:
    parts = [str(_DECODE_VERSION)]
    for src in SOURCES[(data, split)].values():
        st = (data_dir / src.relpath).stat()
        parts.append(f"{src.md5}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_arrays(data: str, split: str, data_dir: str | Path | None = None, download: bool = True) -> dict[str, np.ndarray]:
    """Decoded arrays of one split, from the cache when the source files are unchanged."""
    if data not in DATASETS:
        raise SpecError(f"unknown data set {data!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise SpecError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"data directory {root} is not a directory")
    _ensure(root, SOURCES[(data, split)], download)
    cached = cache_dir() / "decoded" / f"{data}-{split}-{_cache_key(data, split, root)}"
    if (cached / "done.json").is_file():
        try:
            return {p.stem: np.load(p, allow_pickle=False) for p in sorted(cached.glob("*.npy"))}
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt from the verified sources below
    arrays = _decode(data, split, root)
    _write_cache(cached, arrays)
    return arrays


def _write_cache(dest: Path, arrays: dict[str, np.ndarray]) -> None:
    """Store decoded arrays atomically; caching is an optimisation, so failures are ignored."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    except OSError:
        return
    try:
        for key, arr in arrays.items():
            np.save(tmp / f"{key}.npy", arr, allow_pickle=False)
        (tmp / "done.json").write_text(json.dumps({k: list(v.shape) for k, v in arrays.items()}))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class Dataset:
    """Inputs and labels of one split, ready for a recurrent classifier."""

    x: torch.Tensor  # (N, steps, inputs) float32
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def steps(self) -> int:
        return self.x.shape[1]

    @property
    def inputs(self) -> int:
        return self.x.shape[2]

    def subset(self, index: torch.Tensor | slice) -> Dataset:
        return Dataset(self.x[index], self.y[index])


def input_shape(data: str) -> tuple[int, int]:
    """(steps, inputs per step) of a data set's sequences (Tables I-III)."""
    if data == "rows":
        return 28, 28
    if data == "strokes":
        return STROKE_STEPS, 2
    raise SpecError(f"unknown data set {data!r}; choose one of {', '.join(DATASETS)}")


def load_dataset(
    data: str,
    split: str,
    data_dir: str | Path | None = None,
    *,
    stroke_repr: str = "absolute",
    limit: int | None = None,
    download: bool = True,
) -> Dataset:
    """Load one split as network inputs.

    Args:
        data: ``rows`` or ``strokes``.
        split: ``train`` (60,000 digits) or ``test`` (10,000).
        data_dir: data directory (see module docstring).
        stroke_repr: ``absolute`` or ``offsets`` (strokes only).
        limit: keep only the first ``limit`` samples.
        download: fetch missing files from their public sources.
    """
    if limit is not None and limit < 1:
        raise SpecError(f"limit must be >= 1, got {limit}")
    arrays = load_arrays(data, split, data_dir, download)
    n = len(arrays["labels"]) if limit is None else min(limit, len(arrays["labels"]))
    if data == "rows":
        x = arrays["images"][:n].astype(np.float32) / 255.0
    else:
        x = stroke_inputs(arrays["points"][:n], arrays["lengths"][:n], stroke_repr)
    return Dataset(torch.from_numpy(x), torch.from_numpy(arrays["labels"][:n].copy()))


def stroke_lengths(split: str = "train", data_dir: str | Path | None = None) -> np.ndarray:
    """Number of pen points of every stroke sequence of a split (Fig. 6)."""
    return load_arrays("strokes", split, data_dir)["lengths"].astype(np.int64)
