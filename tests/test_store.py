import os
import pickle

import pandas as pd
import pytest
import torch

from dni.errors import StoreError
from dni.models import build_model
from dni.spec import TrainSpec
from dni.store import Store, atomic_write


def _save(store, **kw):
    spec = TrainSpec(**kw)
    torch.manual_seed(0)
    model = build_model(spec.arch, 28 if spec.data == "rows" else 2)
    return spec, model, store.save_model(spec, model, {"note": "test"})


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


@pytest.mark.parametrize("arch,data", [("lstm", "rows"), ("lstm", "strokes"), ("rnn", "rows")])
def test_round_trip_is_bit_identical(tmp_path, arch, data):
    store = Store(tmp_path / "store")
    spec, model, mid = _save(store, arch=arch, data=data)
    loaded = store.load_model(mid)
    assert loaded.spec == spec and loaded.meta["note"] == "test"
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert store.model_ids() == [mid] and store.resolve(mid[:12]) == mid


def test_weights_are_not_pickles(tmp_path):
    store = Store(tmp_path)
    _, _, mid = _save(store)
    raw = (store.model_dir(mid) / "weights.safetensors").read_bytes()
    with pytest.raises(Exception):
        pickle.loads(raw)


def test_saving_twice_is_refused_and_force_replaces(tmp_path):
    store = Store(tmp_path)
    spec, model, mid = _save(store)
    with pytest.raises(StoreError, match="already"):
        store.save_model(spec, model, {})
    store.save_model(spec, model, {"note": "again"}, overwrite=True)
    assert store.read_meta(mid)["note"] == "again"
    assert [p.name for p in store.models_dir.iterdir()] == [mid]


def test_corrupted_checkpoints_are_detected(tmp_path):
    store = Store(tmp_path)
    _, _, mid = _save(store)
    path = store.model_dir(mid) / "weights.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(StoreError, match="corrupted"):
        store.load_model(mid)
    flipped = bytearray(good)
    flipped[-100] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(StoreError, match="corrupted"):
        store.load_model(mid)
    path.write_bytes(good)
    (store.model_dir(mid) / "meta.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupted"):
        store.load_model(mid)


def test_weights_that_do_not_match_the_spec_are_refused(tmp_path):
    store = Store(tmp_path)
    spec, _, mid = _save(store)
    other = Store(tmp_path / "other")
    _, _, rnn_id = _save(other, arch="rnn")
    # Put RNN weights (with a matching checksum) under the LSTM spec.
    (store.model_dir(mid) / "weights.safetensors").write_bytes((other.model_dir(rnn_id) / "weights.safetensors").read_bytes())
    meta = store.read_meta(mid)
    meta["weights_sha256"] = other.read_meta(rnn_id)["weights_sha256"]
    import json

    (store.model_dir(mid) / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="does not match its spec"):
        store.load_model(mid)


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "f.csv"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StoreError, match="disk full"):
        atomic_write(target, b"new content")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.csv"]


def test_failed_model_save_leaves_the_store_unchanged(tmp_path, monkeypatch):
    store = Store(tmp_path)
    _save(store)
    before = _snapshot(tmp_path)
    import dni.store

    monkeypatch.setattr(dni.store.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(StoreError, match="No space left"):
        _save(store, sigma_train=0.5)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before
    assert not [p for p in store.models_dir.iterdir() if p.name.startswith(".")]


def test_store_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        Store(f)


def test_unknown_model(tmp_path):
    with pytest.raises(StoreError, match="no model"):
        Store(tmp_path).resolve("lstm-nothing")


def test_add_cells_merges_and_keeps_existing(tmp_path):
    store = Store(tmp_path)
    _, _, mid = _save(store)
    cols = ["sigma_val", "repeat", "accuracy"]
    store.add_cells(mid, "p1", pd.DataFrame({"sigma_val": [0.0, 0.1], "repeat": [0, 0], "accuracy": [0.9, 0.8]}), ["sigma_val", "repeat"])
    merged = store.add_cells(mid, "p1", pd.DataFrame({"sigma_val": [0.1, 0.0], "repeat": [0, 1], "accuracy": [0.1, 0.7]}), ["sigma_val", "repeat"])
    assert merged[cols].values.tolist() == [[0.0, 0, 0.9], [0.0, 1, 0.7], [0.1, 0, 0.8]]
    assert store.read_cells(mid, "p1", cols).values.tolist() == merged[cols].values.tolist()
    (store.eval_path(mid, "p1")).write_text("sigma_val,repeat\n0,0\n")
    with pytest.raises(StoreError, match="lacks column"):
        store.read_cells(mid, "p1", cols)
