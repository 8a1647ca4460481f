"""The CUDA paths: skipped on machines without a GPU, run wherever one is present.

CPU and GPU results agree to float32 rounding, not bit for bit (README, "Guarantees"):
the noise stream is the same Philox stream on both, but matrix products and
transcendental functions round differently.
"""

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dni import kernels
from dni.cli import app
from dni.evaluate import evaluate
from dni.models import build_model
from dni.noise import make_generator, make_noise
from dni.spec import EvalSpec, TrainSpec
from dni.store import Store
from dni.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")
runner = CliRunner()


def test_philox_stream_is_the_same_on_the_gpu():
    cpu = kernels.normal_torch(100_003, key=1234, counter=77, device="cpu")
    gpu = kernels.normal_torch(100_003, key=1234, counter=77, device=CUDA).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-6)
    assert abs(float(gpu.std()) - 1.0) < 0.01


def test_the_gpu_draws_the_philox_stream_with_its_triton_kernel():
    from dni import gpu_philox

    if gpu_philox.triton is None:
        pytest.skip("Triton is not installed (it comes with torch's CUDA builds)")
    assert gpu_philox.available(CUDA)
    n, key, counter = 1_000_003, 99, 2**33 + 1
    gpu = gpu_philox.normal(n, key, counter, CUDA).cpu()
    cpu = kernels.normal_torch(n, key, counter)
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-6)
    # float64 libdevice against torch's float64 functions: a last bit apart at most, which
    # rounding to float32 nearly always hides
    assert float((gpu == cpu).float().mean()) > 0.999


def test_ars_stream_is_the_same_on_the_gpu():
    """The ARS stream on a GPU comes from the torch-op AES (no Triton kernel): its words equal
    the CPU's bit for bit, its normals to float rounding, and a noisy pass drawn from it on
    the GPU matches the CPU's."""
    words_cpu = kernels.ars_blocks_torch(1234, 77, 4096)
    words_gpu = kernels.ars_blocks_torch(1234, 77, 4096, CUDA).cpu()
    assert torch.equal(words_gpu, words_cpu)
    cpu = kernels.normal_torch(100_003, key=1234, counter=77, device="cpu", stream="ars")
    gpu = kernels.normal_torch(100_003, key=1234, counter=77, device=CUDA, stream="ars").cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-6)
    assert abs(float(gpu.std()) - 1.0) < 0.01
    torch.manual_seed(0)
    model = build_model("lstm", 28).eval()
    gpu_model = build_model("lstm", 28).to(CUDA).eval()
    gpu_model.load_state_dict(model.state_dict())
    x = torch.rand(64, 28, 28)
    with torch.no_grad():
        noisy_cpu = model(x, make_noise("additive", 0.5), make_generator("ars", 5, "cpu"))
        noisy_gpu = gpu_model(x.to(CUDA), make_noise("additive", 0.5), make_generator("ars", 5, CUDA))
    torch.testing.assert_close(noisy_gpu.cpu(), noisy_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ["lstm", "rnn", "gru"])
def test_noise_free_and_noisy_forward_match_the_cpu(arch):
    torch.manual_seed(0)
    model = build_model(arch, 28).eval()
    x = torch.rand(64, 28, 28)
    gpu_model = build_model(arch, 28).to(CUDA).eval()
    gpu_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        clean_cpu = model(x, make_noise("additive", 0.0), None)
        clean_gpu = gpu_model(x.to(CUDA), make_noise("additive", 0.0), None)
        # sigma = 0 is exactly the noise-free network on the GPU too.
        assert torch.equal(clean_gpu, gpu_model(x.to(CUDA), make_noise("additive", 0.0), make_generator("philox", 5, CUDA)))
        torch.testing.assert_close(clean_gpu.cpu(), clean_cpu, rtol=1e-4, atol=1e-4)
        noise = make_noise("additive", 0.5)
        noisy_cpu = model(x, noise, make_generator("philox", 5, "cpu"))
        noisy_gpu = gpu_model(x.to(CUDA), noise, make_generator("philox", 5, CUDA))
    # Same Philox draws on both devices: the noisy outputs agree, and differ from the clean ones.
    torch.testing.assert_close(noisy_gpu.cpu(), noisy_cpu, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(noisy_cpu, clean_cpu, atol=1e-2)


def test_torch_generator_on_the_gpu_has_the_right_std():
    gen = make_generator("torch", 3, CUDA)
    pre = torch.zeros(200_000, device=CUDA)
    z = make_noise("additive", 0.7)(pre, gen)
    assert z.device.type == "cuda" and abs(float(z.std()) - 0.7) < 0.01


def test_train_on_gpu_then_evaluate_on_both(fixture_data, tmp_path):
    spec = TrainSpec(arch="lstm", sigma_train=0.5, epochs=2, limit_train=200, val_size=40, batch_size=32)
    result = train(spec, fixture_data, device=CUDA)
    assert all(p.device.type == "cuda" for p in result.model.parameters())
    assert result.meta["device"] == torch.cuda.get_device_name(CUDA)
    ev = EvalSpec(sigma_val=(0.0, 1.0), repeats=3, limit_test=100)
    runs = {}
    for device in ("cpu", "cuda"):  # one store each: the second would reuse the first's cells
        store = Store(tmp_path / device)
        store.save_model(spec, result.model, result.meta)
        runs[device] = evaluate(store, [spec.model_id], ev, fixture_data, device=device)
    on_cpu, on_gpu = runs["cpu"], runs["cuda"]
    assert list(on_cpu.columns) == list(on_gpu.columns)
    # Same noise draws; rounding can flip a digit or two of 100.
    diff = (on_cpu["accuracy"] - on_gpu["accuracy"]).abs()
    assert diff.max() <= 0.03, pd.concat([on_cpu, on_gpu])


def test_cli_train_evaluate_and_sweep_on_cuda(fixture_data, tmp_path):
    store = tmp_path / "store"
    tiny = ["--limit-train", "120", "--val-size", "20", "--epochs", "1", "--batch-size", "32", "--store", str(store)]
    res = runner.invoke(app, ["train", "--arch", "rnn", "--device", "cuda", *tiny])
    assert res.exit_code == 0, res.output
    out = tmp_path / "eval.csv"
    res = runner.invoke(app, ["evaluate", "--store", str(store), "--sigma-val", "0,0.5", "--repeats", "2",
                              "--limit-test", "50", "--device", "cuda", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(out)) == 4
    res = runner.invoke(app, ["sweep", "--arch", "rnn", "--sigma-train", "0,0.5", "--sigma-val", "0,1", "--repeats", "2",
                              "--limit-test", "50", "--device", "cuda", "--jobs", "1", *tiny])
    assert res.exit_code == 0, res.output


def test_bf16_precision_on_the_gpu_agrees_with_the_cpu():
    from dni.precision import products_in

    torch.manual_seed(0)
    model = build_model("lstm", 28).eval()
    gpu_model = build_model("lstm", 28).to(CUDA).eval()
    gpu_model.load_state_dict(model.state_dict())
    x = torch.rand(64, 28, 28)
    noise = make_noise("additive", 0.5)
    with torch.no_grad():
        fp32_gpu = gpu_model(x.to(CUDA), noise, make_generator("philox", 5, CUDA))
        with products_in(model, "bf16"), products_in(gpu_model, "bf16"):
            cpu = model(x, noise, make_generator("philox", 5, "cpu"))
            gpu = gpu_model(x.to(CUDA), noise, make_generator("philox", 5, CUDA))
    # bf16 rounding amplifies last-bit differences (dni/precision.py): agreement to ~1e-3
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=5e-3, atol=5e-3)
    assert not torch.equal(gpu, fp32_gpu)


def test_bench_runs_on_the_gpu(monkeypatch):
    """``dni bench --device cuda`` measures every case there (one call per timing here)."""
    from dni import bench

    def once(fns, min_time=1.0, reps=3):
        for fn in fns.values():
            fn()
        return dict.fromkeys(fns, 0.01)

    monkeypatch.setattr(bench, "_time_all", once)  # _time too: it calls _time_all
    result = bench.run(quick=True, log=lambda line: None, device=CUDA)
    assert result["device"] == torch.cuda.get_device_name(CUDA)
    assert set(result["noisy_vs_fused"]) == {"lstm_rows", "lstm_strokes", "rnn_rows"}
    assert "workers_lstm_rows" not in result and result["gemm_peak_bf16_gflops"] is None


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_a_gpu_pass_draws_its_noise_ahead_with_the_same_bits(monkeypatch, arch):
    """On the GPU a noisy pass computes its Philox samples in one go; its logits equal those
    of drawing at every step, bit for bit."""
    from dni.noise import AdditiveGaussian, PhiloxGenerator

    torch.manual_seed(0)
    model = build_model(arch, 28).to(CUDA).eval()
    x = torch.rand(1000, 28, 28, device=CUDA)
    with torch.no_grad():
        ahead = model(x, AdditiveGaussian(0.6), PhiloxGenerator(3))
        monkeypatch.setattr(PhiloxGenerator, "draws_ahead_on", staticmethod(lambda device: False))
        direct = model(x, AdditiveGaussian(0.6), PhiloxGenerator(3))
    assert torch.equal(ahead, direct)


@pytest.mark.parametrize("rng", ["torch", "philox"])
def test_a_stack_on_the_gpu_trains_each_member_as_it_trains_alone(fixture_data, rng):
    """On a GPU (the default there) a stack's members get what training each alone gives,
    up to float rounding (batched and single products may round differently there); with
    Philox the stack draws each pass's samples ahead. Its validation and test passes run
    all members at once."""
    import dataclasses

    from dni.train import train_stack

    base = TrainSpec(arch="lstm", epochs=1, limit_train=200, val_size=40, batch_size=32, rng=rng)
    specs = [dataclasses.replace(base, sigma_train=s) for s in (0.0, 0.5, 1.0)]
    together = train_stack(specs, fixture_data, device=CUDA)
    for spec, stacked in zip(specs, together):
        alone = train(spec, fixture_data, device=CUDA)
        for a, b in zip(alone.model.state_dict().values(), stacked.model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
        assert len(stacked.meta["stack"]["members"]) == 3 and stacked.model.weight.device.type == "cuda"
        assert abs(alone.val_accuracy - stacked.val_accuracy) <= 2 / 40  # a digit near a class boundary may flip
        assert abs(alone.history[0]["val_accuracy_clean"] - stacked.history[0]["val_accuracy_clean"]) <= 2 / 40
        assert abs(alone.test_accuracy - stacked.test_accuracy) <= 0.01


def test_the_repeats_of_a_point_run_together_on_the_gpu_as_they_run_one_by_one():
    from dni.noise import AdditiveGaussian, PhiloxGenerator

    torch.manual_seed(0)
    model = build_model("lstm", 28).to(CUDA).eval()
    with torch.no_grad():
        xp = model.project(torch.rand(200, 28, 28, device=CUDA))
        gens = [PhiloxGenerator(seed) for seed in (1, 2, 3)]
        assert model.recurs_repeats(xp, AdditiveGaussian(0.5), gens)
        together = model.recur_repeats(xp, AdditiveGaussian(0.5), gens)
        for seed, logits in zip((1, 2, 3), together):
            torch.testing.assert_close(logits, model.recur(xp, AdditiveGaussian(0.5), PhiloxGenerator(seed)), rtol=1e-4, atol=1e-4)


def test_the_lstm_cell_runs_as_one_kernel_each_way_on_the_gpu(monkeypatch):
    """dni.gpu_cells against the torch ops of NoisyLSTM.step, on a stack's shape: values and
    gradients to float rounding."""
    from dni import gpu_cells

    if gpu_cells.triton is None:
        pytest.skip("Triton is not installed (it comes with torch's CUDA builds)")
    torch.manual_seed(0)
    model = build_model("lstm", 28).to(CUDA)
    pre = (3 * torch.randn(11, 128, 512, device=CUDA)).requires_grad_()
    c = torch.randn(11, 128, 128, device=CUDA).requires_grad_()
    dh, dc = torch.randn(11, 128, 128, device=CUDA), torch.randn(11, 128, 128, device=CUDA)
    assert gpu_cells.available(pre)
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(gpu_cells, "available", lambda pre: kernel)
        h, c_new = model.step(pre, c)
        results.append([h, c_new, *torch.autograd.grad((h * dh).sum() + (c_new * dc).sum(), (pre, c))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
