"""Regenerate tests/fixtures/data: the first digits of the real data files, in their formats.

Usage: python tests/make_fixtures.py SOURCE_DATA_DIR
The md5 of each fixture's uncompressed content is written to fixtures/data/md5.json, which the
tests use in place of the published checksums of the full files.
"""

import gzip
import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np

N_TRAIN, N_TEST = 400, 200
src = Path(sys.argv[1])
dst = Path(__file__).parent / "fixtures" / "data"
md5 = {}


def put(rel: str, raw: bytes, member: str | None = None) -> None:
    path = dst / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if member is None:
        with gzip.GzipFile(path, "wb", mtime=0) as fh:
            fh.write(raw)
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo(member)
            info.size, info.mtime = len(raw), 0
            tar.addfile(info, io.BytesIO(raw))
        path.write_bytes(buf.getvalue())
    md5[rel] = hashlib.md5(raw).hexdigest()


for name, n in (("train", N_TRAIN), ("t10k", N_TEST)):
    for kind, item in (("images", 784), ("labels", 1)):
        raw = gzip.open(src / f"mnist/{name}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz").read()
        header = 16 if kind == "images" else 8
        head = bytearray(raw[:header])
        head[4:8] = n.to_bytes(4, "big")
        put(f"mnist/{name}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz", bytes(head) + raw[header : header + n * item])

for name, n in (("train-padded-trailing", N_TRAIN), ("test-padded-leading", N_TEST), ("train-labels", N_TRAIN), ("test-labels", N_TEST)):
    with tarfile.open(src / f"mnist-strokes/{name}.tar.gz") as tar:
        arr = np.load(io.BytesIO(tar.extractfile(f"{name}.npy").read()))
    buf = io.BytesIO()
    np.save(buf, arr[:n])
    put(f"mnist-strokes/{name}.tar.gz", buf.getvalue(), member=f"{name}.npy")

for f in sorted((src / "mnist-strokes/examples").glob("*.txt")):
    shutil.copy(f, dst / "mnist-strokes/examples" / f.name)
(dst / "md5.json").write_text(json.dumps(md5, indent=2, sort_keys=True) + "\n")
print(f"wrote fixtures to {dst}")
