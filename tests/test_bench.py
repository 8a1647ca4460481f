"""``dni bench``: its baseline computes the model, and its summary holds the ratios of #5's goals.

Timings themselves are not tested (a benchmark measures speed; a test must not depend on
it): the timer is replaced by one that calls each function once.
"""

import json

import pytest
import torch

from dni import bench
from dni.models import build_model
from dni.noise import AdditiveGaussian, PhiloxGenerator


@pytest.mark.parametrize("arch,inputs", [("lstm", 28), ("lstm", 2), ("rnn", 28)])
def test_naive_baseline_computes_the_model(arch, inputs):
    """The straightforward loop is a fair baseline: at sigma 0 it is the model's own output."""
    torch.manual_seed(0)
    model = build_model(arch, inputs).eval()
    x = torch.rand(50, 28 if inputs == 28 else 50, inputs)
    with torch.no_grad():
        naive = bench.naive_noisy(model, x, 0.0, torch.Generator().manual_seed(0))
        ours = model(x, AdditiveGaussian(0.0), PhiloxGenerator(0))
    torch.testing.assert_close(naive, ours, rtol=1e-4, atol=1e-5)


def test_summary_holds_every_goal_ratio(monkeypatch):
    calls = []

    def once(fn, min_time=1.0, reps=3):
        calls.append(fn)
        fn()
        return 0.01 * len(calls)  # distinct, known times

    monkeypatch.setattr(bench, "_time", once)
    lines, before = [], torch.get_num_threads()
    try:
        result = bench.run(threads=1, quick=True, with_workers=False, log=lines.append)
    finally:
        torch.set_num_threads(before)
    json.loads(bench.summary_line(result))  # one valid JSON line
    cases = ("lstm_rows", "lstm_strokes", "rnn_rows")
    for key in ("noisy_vs_fused", "noisy_vs_naive", "frac_of_peak", "train_vs_fused"):
        assert set(result[key]) == set(cases)
    for case in cases:
        r = result[f"infer_{case}"]
        assert result["noisy_vs_fused"][case] == pytest.approx(r["dni"] / r["fused"])
        assert result["noisy_vs_naive"][case] == pytest.approx(r["dni"] / r["naive"])
        t = result[f"train_{case}"]
        assert result["train_vs_fused"][case] == pytest.approx(t["dni"] / t["fused"])
        assert 0 < r["dni"] and 0 < t["dni_autograd"]
    assert result["threads"] == 1
    assert any(line.startswith("lstm strokes") for line in lines)
