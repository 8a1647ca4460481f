"""Inference at bf16 precision (dni.precision): what is rounded, where, and how it is stored."""

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dni.cli import app
from dni.errors import SpecError
from dni.evaluate import evaluate
from dni.models import build_model
from dni.noise import AdditiveGaussian, PhiloxGenerator
from dni.precision import operand, products_in
from dni.spec import EvalSpec, TrainSpec
from dni.store import Store


def _bf16(t):
    return t.to(torch.bfloat16).float()


def _reference(model, x, noise, gen):
    """bf16 inference written out: both operands of every product rounded, fp32 sums."""
    i = model.input_size
    w_x, w_h = _bf16(model.weight[:, :i]), _bf16(model.weight[:, i:])
    steps = x.shape[1]
    xt = _bf16(x.transpose(0, 1).reshape(-1, i))
    xp = torch.addmm(model.bias, xt, w_x.t()).view(steps, x.shape[0], -1)
    h = x.new_zeros(x.shape[0], model.hidden_size)
    c = torch.zeros_like(h)
    for t in range(steps):
        pre = noise(torch.addmm(xp[t], _bf16(h), w_h.t()), gen)
        h, c = model.step(pre, c)
    return noise(torch.nn.functional.linear(_bf16(h), _bf16(model.fc.weight), model.fc.bias), gen)


def test_operand_rounds_to_bfloat16_only_at_bf16():
    t = torch.randn(1000)
    assert operand(t, "fp32") is t
    r = operand(t, "bf16")
    assert r.dtype == torch.float32 and torch.equal(r, r.to(torch.bfloat16).float())
    assert not torch.equal(r, t)
    assert float(((r - t).abs() / t.abs()).max()) <= 2.0**-8  # round to nearest: half an ulp of an 8-bit significand


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_generic_bf16_path_rounds_every_product(arch, sigma):
    torch.manual_seed(1)
    model = build_model(arch, 28).eval()
    x = torch.rand(64, 28, 28)
    noise = AdditiveGaussian(sigma)
    with torch.no_grad():
        want = _reference(model, x, noise, PhiloxGenerator(3))
        fp32 = model.recur(model.project(x), noise, PhiloxGenerator(3), observer=lambda *a: None)
        with products_in(model, "bf16"):
            got = model.recur(model.project(x), noise, PhiloxGenerator(3), observer=lambda *a: None)  # the generic loop
    assert torch.equal(got, want)
    assert not torch.equal(got, fp32)
    assert model.precision == "fp32"  # restored


def test_gru_rounds_its_products_too():
    torch.manual_seed(2)
    model = build_model("gru", 28).eval()
    x = torch.rand(32, 28, 28)
    with torch.no_grad():
        fp32 = model(x, AdditiveGaussian(0.0))
        with products_in(model, "bf16"):
            bf16 = model(x, AdditiveGaussian(0.0))
    assert not torch.equal(fp32, bf16)
    assert float((fp32 - bf16).abs().max()) < 0.05


def test_products_in_restores_the_precision_on_errors():
    model = build_model("lstm", 28)
    with pytest.raises(RuntimeError), products_in(model, "bf16"):
        assert model.precision == "bf16"
        raise RuntimeError("boom")
    assert model.precision == "fp32"
    with pytest.raises(SpecError, match="unknown precision"), products_in(model, "fp8"):
        pass


def _needs_bf16_gemm(lib):
    if not lib.bf16:
        pytest.skip("torch's library has no usable bf16 GEMM")


def test_bf16_gemm_is_as_accurate_as_fp32_sums(lib):
    """The BLAS's bf16 GEMM sums the exact products of the rounded operands in fp32: its
    error against float64 sums stays within the fp32 bound K * 2^-24 * sum |a||w|."""
    _needs_bf16_gemm(lib)
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(100, 128, generator=gen), torch.randn(96, 128, generator=gen)
    w16 = w.to(torch.bfloat16)
    out = torch.empty(100, 96)
    assert lib.dni_blas_mm_bf16(a.data_ptr(), w16.data_ptr(), out.data_ptr(), 100, 96, 128) == 0
    a16, w64 = _bf16(a).double(), w16.double()
    err = (out.double() - a16 @ w64.t()).abs()
    assert bool((err <= 128 * 2.0**-24 * (a16.abs() @ w64.abs().t())).all())
    assert not torch.equal(out, torch.mm(a, w.t()))  # a really rounded its operand


@pytest.mark.parametrize("arch,data", [("lstm", "rows"), ("lstm", "strokes"), ("rnn", "rows")])
def test_compiled_bf16_loop_agrees_with_the_generic_one(lib, arch, data, two_threads):
    """Same maths, other summation order (and gate rounding): the logits agree to the
    sensitivity of bf16 rounding, and the predictions almost everywhere."""
    _needs_bf16_gemm(lib)
    steps, inputs = (28, 28) if data == "rows" else (50, 2)
    torch.manual_seed(3)
    model = build_model(arch, inputs).eval()
    x = torch.rand(400, steps, inputs)
    noise = AdditiveGaussian(0.5)
    with torch.no_grad(), products_in(model, "bf16"):
        xp = model.project(x)
        inline = model.inline_projection(x, xp)
        assert (inline is not None) == (data == "strokes")
        fused = model.recur(xp, noise, PhiloxGenerator(9), inline=inline)
        generic = model.recur(xp, noise, PhiloxGenerator(9), observer=lambda *a: None)
    with torch.no_grad():
        fp32 = model.recur(model.project(x), noise, PhiloxGenerator(9))
    assert float((fused - generic).abs().max()) < 5e-3
    assert float((fused.argmax(1) == generic.argmax(1)).float().mean()) >= 0.99
    assert float((fused - fp32).abs().max()) > 1e-5  # not the fp32 loop


def test_bf16_cells_are_stored_under_their_own_protocol(tmp_path, fixture_data):
    store = Store(tmp_path / "store")
    spec = TrainSpec(limit_train=100, val_size=10, epochs=1)
    torch.manual_seed(0)
    store.save_model(spec, build_model("lstm", 28), {})
    mid = spec.model_id
    fp32, bf16 = EvalSpec(sigma_val=(0.0, 1.0), repeats=2, batch_size=64), EvalSpec(sigma_val=(0.0, 1.0), repeats=2, batch_size=64, precision="bf16")
    assert "precision" not in fp32.protocol and bf16.protocol["precision"] == "bf16"
    assert fp32.protocol_id == EvalSpec(sigma_val=(0.0, 1.0), repeats=2, batch_size=64).protocol_id != bf16.protocol_id
    a, b = evaluate(store, [mid], fp32), evaluate(store, [mid], bf16)
    assert "precision" not in a.columns and set(b["precision"]) == {"bf16"}
    assert store.eval_path(mid, fp32.protocol_id).is_file() and store.eval_path(mid, bf16.protocol_id).is_file()
    assert abs(a["accuracy"].mean() - b["accuracy"].mean()) < 0.05  # an untrained model: near chance either way
    with pytest.raises(SpecError, match="unknown precision"):
        EvalSpec(precision="fp16")


def test_cli_evaluate_at_bf16(tmp_path, fixture_data):
    store = Store(tmp_path / "store")
    spec = TrainSpec(limit_train=100, val_size=10, epochs=1)
    torch.manual_seed(0)
    store.save_model(spec, build_model("lstm", 28), {})
    args = ["evaluate", "--store", tmp_path / "store", "--sigma-val", "0.5", "--repeats", "2", "--limit-test", "100",
            "--device", "cpu", "--out", tmp_path / "r.csv"]
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--precision", "bf16"]])
    assert res.exit_code == 0, res.output
    assert set(pd.read_csv(tmp_path / "r.csv")["precision"]) == {"bf16"}
    bad = CliRunner().invoke(app, [str(a) for a in [*args, "--precision", "fp8"]])
    assert bad.exit_code != 0 and "unknown precision" in bad.output


def test_without_a_bf16_gemm_bf16_takes_the_generic_loop(lib, monkeypatch):
    from dni import kernels

    monkeypatch.setattr(lib, "bf16", False)
    torch.manual_seed(4)
    model = build_model("lstm", 28).eval()
    x = torch.rand(48, 28, 28)
    noise = AdditiveGaussian(0.4)
    with torch.no_grad():
        with products_in(model, "bf16"):
            got = model.recur(model.project(x), noise, PhiloxGenerator(2))
        assert torch.equal(got, _reference(model, x, noise, PhiloxGenerator(2)))
    h, c = torch.zeros(4, 128), torch.zeros(4, 128)
    w_h = model.weight[:, 28:].detach()
    with pytest.raises(ValueError, match="bf16 GEMM"):
        kernels.fused_recurrence(lib, "lstm", torch.zeros(3, 4, 512), w_h, h, c, 1, [0, 0, 0], 0.0, w_h16=w_h.to(torch.bfloat16))


@pytest.mark.parametrize("arch,inputs,steps", [("lstm", 28, 28), ("lstm", 2, 50), ("rnn", 28, 28)])
def test_compiled_bf16_loop_does_not_depend_on_the_thread_count(lib, arch, inputs, steps):
    _needs_bf16_gemm(lib)
    torch.manual_seed(5)
    model = build_model(arch, inputs).eval()
    x = torch.rand(300, steps, inputs)
    before, outs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad(), products_in(model, "bf16"):
                xp = model.project(x)
                outs.append(model.recur(xp, AdditiveGaussian(0.5), PhiloxGenerator(1), inline=model.inline_projection(x, xp)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
