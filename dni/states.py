"""Per-step distributions of the recurrent states under noise (Figs. 3, 4, 7, 8).

One noisy pass over the test set (the cell of repeat 0, same seed as in evaluation)
records, for every time step t, the histogram of all output states h_t (and LSTM cell
states c_t) over samples and units. The histograms are stored as tidy CSV data, so the
figures are drawn from data and never recompute the network.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import torch

from dni.data import load_dataset
from dni.evaluate import cell_seed
from dni.noise import make_generator, make_noise
from dni.precision import products_in
from dni.spec import EvalSpec
from dni.store import Store, read_csv, write_csv

#: Histogram ranges: h is bounded by tanh; c is not: values outside [-10, 10] are clipped
#: into the first/last bin (visible as spikes at the edges for noise-trained models).
BINS = {"h": np.linspace(-1.0, 1.0, 101), "c": np.linspace(-10.0, 10.0, 201)}
STATE_COLUMNS = ["model_id", "arch", "data", "sigma_train", "sigma_val", "state", "step", "bin_left", "bin_right", "count"]


@torch.no_grad()
def record_states(store: Store, model_id: str, ev: EvalSpec, sigma_val: float, data_dir=None, device="cpu") -> pd.DataFrame:
    """Histograms of h_t (and c_t) at every step for one (model, sigma_val); cached in the store."""
    path = store.model_dir(model_id) / "states" / f"{ev.protocol_id}-{float(sigma_val)!r}.csv"
    if path.is_file():
        return read_csv(path, STATE_COLUMNS)
    stored = store.load_model(model_id, device)
    spec, model = stored.spec, stored.model
    test = load_dataset(spec.data, "test", data_dir, stroke_repr=spec.stroke_repr, limit=ev.limit_test)
    steps = test.steps
    counts = {s: np.zeros((steps, len(b) - 1), dtype=np.int64) for s, b in BINS.items()}
    edges = {s: torch.as_tensor(b, dtype=torch.float32) for s, b in BINS.items()}

    def observe(t: int, h: torch.Tensor, c: torch.Tensor | None) -> None:
        for name, value in (("h", h), ("c", c)):
            if value is None:
                continue
            e = edges[name]
            v = value.detach().float().clamp(e[0].item(), e[-1].item()).cpu().flatten()
            counts[name][t] += torch.histc(v, bins=len(e) - 1, min=e[0].item(), max=e[-1].item()).to(torch.int64).numpy()

    noise = make_noise(ev.noise, sigma_val)
    gen = make_generator(ev.rng, cell_seed(ev.seed, model_id, sigma_val, 0), device)
    with products_in(model, ev.precision):
        for start in range(0, len(test), ev.batch_size):
            x = test.x[start : start + ev.batch_size].to(device)
            model(x, noise, gen, observer=observe)
    rows = []
    for name, b in BINS.items():
        if name == "c" and spec.arch != "lstm":
            continue
        for t in range(steps):
            for k in range(len(b) - 1):
                rows.append((model_id, spec.arch, spec.data, spec.sigma_train, float(sigma_val), name, t + 1, b[k], b[k + 1], int(counts[name][t, k])))
    df = pd.DataFrame(rows, columns=STATE_COLUMNS)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, df)
    return df
