"""``dni bench``: its baseline computes the model, and its summary holds the ratios of #5's goals.

Timings themselves are not tested (a benchmark measures speed; a test must not depend on
it): the timer is replaced by one that calls each function once.
"""

import json

import pytest
import torch

from dni import bench, mkl_path
from dni.models import build_model
from dni.noise import AdditiveGaussian, PhiloxGenerator
from dni.train import cpu_name


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


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_summary_holds_every_goal_ratio(monkeypatch, fast_bf16):
    if fast_bf16 and not bench.has_fast_bf16():
        pytest.skip("the BLAS has no bf16 GEMM here")
    monkeypatch.setattr(bench, "has_fast_bf16", lambda device="cpu": fast_bf16)
    calls = []

    def once(fns, min_time=1.0, reps=3):
        times = {}
        for name, fn in fns.items():
            calls.append(fn)
            fn()
            times[name] = 0.01 * len(calls)  # distinct, known times
        return times

    monkeypatch.setattr(bench, "_time_all", once)
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
        assert t["stacked_vs_autograd"] == pytest.approx(t["stacked"] / t["dni_autograd"]) and t["stacked"] > 0
    assert result["threads"] == 1 and result["cpu"] == cpu_name() and f"({cpu_name()})" in lines[0]
    assert result["mkl_path"] == mkl_path.describe() and lines[0].endswith(
        f"MKL's code path: {result['mkl_path']}; torch's CPU kernels: {result['cpu_capability']}")
    assert result["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    loop = result["loop_gemm_gflops"]  # the compiled loop's own products, fp32 and (where the BLAS has it) bf16
    assert loop["fp32"] > 0 and (loop["bf16"] is None) == (not fast_bf16)
    assert any(line.startswith("the compiled loop's products") for line in lines)
    assert result["launch_us"] > 0 and any("one small op" in line for line in lines)
    assert any(line.startswith("lstm strokes") for line in lines)
    fast_ars = bench.has_fast_ars()  # bf16 and the ARS stream: measured where they have their fast paths, else null
    for name, fast in (("bf16", fast_bf16), ("ars", fast_ars)):
        for case in cases:
            r = result[f"infer_{case}"]
            if fast:
                assert result[f"{name}_vs_naive"][case] == pytest.approx(r[f"dni_{name}"] / r["naive"])
                assert result[f"{name}_vs_fused"][case] == pytest.approx(r[f"dni_{name}"] / r["fused"])
            else:
                assert r[f"dni_{name}"] is None and result[f"{name}_vs_naive"][case] is None
                assert result[f"{name}_vs_fused"][case] is None
    assert (result["gemm_peak_bf16_gflops"] is not None) == fast_bf16
    inference_row = next(line for line in lines if line.startswith("lstm rows"))
    assert ("n/a" in inference_row) != fast_bf16
    assert ("ars" in result["normals_per_s"]) == fast_ars
    assert any("--rng ars" in line for line in lines) == fast_ars


def test_timed_calls_wait_for_the_gpu(monkeypatch):
    """On CUDA each timed call ends with a synchronisation (the GPU runs asynchronously);
    on the CPU the function is timed as it is."""
    fn = lambda: None  # noqa: E731
    assert bench._synced(fn, torch.device("cpu")) is fn
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    bench._synced(fn, torch.device("cuda", 1))()
    assert synced == [torch.device("cuda", 1)]


def test_rounds_take_the_functions_in_turn_and_keep_each_ones_best(monkeypatch):
    """Rounds alternate between the functions (a machine that slows down for a while slows
    all of them), after one warm-up call each; each function keeps its fastest round."""
    order = []
    slow = {"a": [5.0, 1.0, 3.0], "b": [2.0, 4.0, 0.5]}

    def fake_round(fn, min_time):
        name = fn()
        order.append(name)
        return slow[name].pop(0)

    monkeypatch.setattr(bench, "_round", fake_round)
    best = bench._time_all({"a": lambda: "a", "b": lambda: "b"}, reps=3)
    assert order == ["a", "b"] * 3 and best == {"a": 1.0, "b": 0.5}
