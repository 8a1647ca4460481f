"""The compiled training path (dni's noise streams, hand-written backward) and the pinned noise bits."""

import hashlib

import pytest
import torch
import torch.nn.functional as F

import dni.train
from dni import kernels, mkl_path
from dni.errors import SpecError
from dni.models import build_model
from dni.noise import AdditiveGaussian, ArsGenerator, PhiloxGenerator, make_generator
from dni.spec import TrainSpec


def _loss_and_grads(model, xs, y, sigma, seed=123, cls=PhiloxGenerator):
    model.zero_grad(set_to_none=True)
    gen = cls(seed)
    outs = [model(x, AdditiveGaussian(sigma), gen) for x in xs]  # several forwards before one backward
    loss = sum(F.cross_entropy(o, y) for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [p.grad.clone() for p in model.parameters()], gen.counter


@pytest.mark.parametrize("arch,inputs,steps", [("lstm", 28, 28), ("lstm", 2, 50), ("rnn", 28, 28)])
@pytest.mark.parametrize("sigma", [0.0, 0.7])
@pytest.mark.parametrize("forwards", [1, 2])
def test_fused_training_matches_autograd_over_the_torch_ops(lib, loop_mode, two_threads, arch, inputs, steps, sigma,
                                                           forwards, monkeypatch):
    torch.manual_seed(0)
    model = build_model(arch, inputs)
    xs = [torch.rand(150, steps, inputs) for _ in range(forwards)]  # two row blocks of 75
    y = torch.randint(0, 10, (150,))
    calls = []
    real = kernels.fused_layer_train
    monkeypatch.setattr(kernels, "fused_layer_train", lambda *a: calls.append(1) or real(*a))
    outs, grads, counter = _loss_and_grads(model, xs, y, sigma)
    assert len(calls) == forwards  # the compiled path ran
    monkeypatch.setattr("dni.models._fused_kernel", lambda *a: None)
    ref_outs, ref_grads, ref_counter = _loss_and_grads(model, xs, y, sigma)
    assert counter == ref_counter  # same stream positions
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch,inputs,steps", [("lstm", 28, 28), ("lstm", 2, 50), ("rnn", 28, 28)])
def test_fused_training_with_ars_noise_matches_autograd(lib, arch, inputs, steps, monkeypatch):
    """The compiled training path draws the ARS stream where the generator is ARS."""
    if not lib.ars:
        pytest.skip("this CPU has no AES instructions")
    torch.manual_seed(0)
    model = build_model(arch, inputs)
    xs, y = [torch.rand(150, steps, inputs)], torch.randint(0, 10, (150,))
    outs, grads, counter = _loss_and_grads(model, xs, y, 0.7, cls=ArsGenerator)
    philox_outs, _, _ = _loss_and_grads(model, xs, y, 0.7)
    assert not torch.allclose(outs[0], philox_outs[0])  # another stream
    monkeypatch.setattr("dni.models._fused_kernel", lambda *a: None)
    ref_outs, ref_grads, ref_counter = _loss_and_grads(model, xs, y, 0.7, cls=ArsGenerator)
    assert counter == ref_counter
    torch.testing.assert_close(outs[0], ref_outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _spy_projections(monkeypatch):
    """Record what kernels.projection_or_inline returns: 'xp' (torch's projections) or 'inline'."""
    seen = []
    real = kernels.projection_or_inline

    def spy(*args):
        xp, inline = real(*args)
        seen.append("inline" if inline is not None else "xp")
        return xp, inline

    monkeypatch.setattr(kernels, "projection_or_inline", spy)
    return seen


@pytest.mark.parametrize("batch", [150, 88])
def test_training_steps_of_strokes_compute_projections_in_the_loop_without_changing_a_bit(lib, loop_mode, two_threads,
                                                                                          batch, monkeypatch):
    """A training batch of a two-input LSTM has its W_x·x_t + b computed in the loop, checked
    against torch's addmm on the first batch of each shape: outputs, gradients and stream
    positions must equal those of reading torch's projections, bit for bit."""
    monkeypatch.setattr(kernels, "_inline_checked", {})
    seen = _spy_projections(monkeypatch)
    torch.manual_seed(0)
    model = build_model("lstm", 2)
    xs = [torch.randn(batch, 50, 2) for _ in range(3)]
    y = torch.randint(0, 10, (batch,))
    outs, grads, counter = _loss_and_grads(model, xs, y, 0.6)
    # the first batch of the shape is checked (and read); the others are computed in the loop
    assert seen == (["xp", "inline", "inline"] if loop_mode != "python" else ["xp"] * 3)
    monkeypatch.setattr(kernels, "SHAPE_CHECKED_INLINE", False)
    ref_outs, ref_grads, ref_counter = _loss_and_grads(model, xs, y, 0.6)
    assert seen[3:] == ["xp"] * 3
    assert counter == ref_counter
    assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs))
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("sigma", [0.0, 0.6])
def test_accuracy_passes_of_strokes_compute_projections_in_the_loop_without_changing_a_bit(lib, loop_mode, sigma,
                                                                                         monkeypatch):
    """model(x) without gradients (training's accuracy passes) on a two-input LSTM skips
    project(x) once the shape is checked; where the check fails, it keeps reading torch's
    projections. The logits are the same bits in every case."""
    monkeypatch.setattr(kernels, "_inline_checked", {})
    seen = _spy_projections(monkeypatch)
    torch.manual_seed(4)
    model = build_model("lstm", 2).eval()
    x = torch.randn(300, 50, 2)

    def logits():
        with torch.no_grad():
            return model(x, AdditiveGaussian(sigma), PhiloxGenerator(5) if sigma else None)

    first, second = logits(), logits()
    assert seen == (["xp", "inline"] if loop_mode != "python" else ["xp", "xp"])
    with monkeypatch.context() as m:
        m.setattr(kernels, "SHAPE_CHECKED_INLINE", False)
        read = logits()
    assert torch.equal(first, read) and torch.equal(second, read)
    if loop_mode != "python":  # a formula that misses torch's bits is never used for that shape
        monkeypatch.setattr(kernels, "_inline_checked", {})
        monkeypatch.setattr(lib, "dni_projection2_mismatches", lambda *a: 1)
        del seen[:]
        assert torch.equal(logits(), read) and torch.equal(logits(), read)
        assert seen == ["xp", "xp"] and kernels._inline_checked == {(50 * 300, 512): False}
        with torch.no_grad(), pytest.raises(ValueError, match="needs the compiled loop"):
            model.recur(None, AdditiveGaussian(0.5), torch.Generator().manual_seed(0))


def test_torch_generator_and_restricted_sites_keep_the_autograd_path(lib, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "fused_layer_train", lambda *a: calls.append(1))
    model = build_model("lstm", 28)
    x = torch.rand(8, 28, 28)
    model(x, AdditiveGaussian(0.5), torch.Generator().manual_seed(0)).sum().backward()
    model(x, AdditiveGaussian(0.5), PhiloxGenerator(0), sites="f,o").sum().backward()
    assert calls == []


def test_train_rng_is_a_spec_field_left_out_of_ids_at_its_default():
    assert TrainSpec().model_id == TrainSpec(rng="torch").model_id
    assert TrainSpec(rng="philox").model_id != TrainSpec().model_id
    with pytest.raises(SpecError):
        TrainSpec(rng="mt19937")


@pytest.mark.parametrize("rng", ["philox", "ars"])
def test_training_with_dni_noise_is_reproducible_and_matches_the_generic_path(lib, fixture_data, monkeypatch, rng):
    if not kernels.draws(lib, rng):
        pytest.skip("this CPU has no AES instructions")
    spec = TrainSpec(arch="lstm", sigma_train=0.5, rng=rng, epochs=1, limit_train=300, val_size=44)
    first = dni.train.train(spec, fixture_data)
    again = dni.train.train(spec, fixture_data)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    monkeypatch.setattr("dni.models._fused_kernel", lambda *a: None)
    generic = dni.train.train(spec, fixture_data)
    for a, b in zip(first.model.state_dict().values(), generic.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert first.history[0]["val_accuracy"] == pytest.approx(generic.history[0]["val_accuracy"], abs=0.05)


# The kernels are built with -march=native, so gcc contracts a * b + c into one rounding
# where the CPU has FMA: the pinned bits need it (AVX2 and AVX-512 CPUs give the same).
needs_fma = pytest.mark.skipif(not {"avx2", "fma"} <= mkl_path.cpu()[1], reason="pinned bits were recorded on x86 CPUs with FMA (contraction)")


PINNED_STREAMS = {  # stream: (digest of 400,003 samples, digest of an LSTM and an RNN step's states)
    "philox": ("2f85f2d14c79ecb572172cf849a730d4d87f3eca1abd4f0d3b0a96668e5b86b8",
               "458ed75eb2bbc64c48dc33e834852dff1742241fe481bd4229f39924d22e7682"),
    "ars": ("ea91b51d1af880099ec181f2949a871ca0c400dc92448fbc6d6552335fabe165",
            "da3b21d8d43d834ad8a32356ce3827ffa8396893a165800ea0ba58e8cb212b0c"),
}


@needs_fma
@pytest.mark.parametrize("rng", list(PINNED_STREAMS))
def test_noise_and_step_bits_are_pinned(lib, rng):
    """The stored evaluation results were computed with Philox's bits: any change to the
    generator or the step kernels that alters them makes the store unreproducible. The ARS
    stream's bits are pinned likewise."""
    if not kernels.draws(lib, rng):
        pytest.skip("this CPU has no AES instructions")
    g = make_generator(rng, 12345)
    g.counter = 2**32 - 7  # the low counter word wraps inside the draw (for ARS, which starts inside a chunk)
    z = g.normal((400_003,), torch.device("cpu"), torch.float32)
    assert hashlib.sha256(z.numpy().tobytes()).hexdigest() == PINNED_STREAMS[rng][0]
    gen = torch.Generator().manual_seed(3)
    batch, hidden = 300, 128
    pre = (torch.rand(batch, 4 * hidden, generator=gen) - 0.5) * 8
    c = torch.rand(batch, hidden, generator=gen) - 0.5
    h, h_rnn = torch.empty(batch, hidden), torch.empty(batch, 4 * hidden)
    stream = kernels.STREAMS[rng]
    lib.dni_lstm_step(pre.data_ptr(), None, c.data_ptr(), h.data_ptr(), batch, hidden, 99, stream, 2**32 - 11, 0.7)
    lib.dni_rnn_step(pre.data_ptr(), None, h_rnn.data_ptr(), batch, 4 * hidden, 99, stream, 2**32 - 11, 0.7)
    digest = hashlib.sha256(c.numpy().tobytes() + h.numpy().tobytes() + h_rnn.numpy().tobytes()).hexdigest()
    assert digest == PINNED_STREAMS[rng][1]


# Logits and gradients also take the BLAS's products (MKL's sgemm), and MKL picks its
# kernels, and with them the order of its sums, by CPU vendor: its AVX-512 path on Intel
# CPUs, another on AMD's. So their pinned bits are per vendor: recorded on Intel AVX-512
# CPUs (with and without AMX: the same bits; the stored results were computed there) and
# on AMD Zen 4 (EPYC, family 25; Zen 5, family 26, and Zen 3, family 25 model 1 with AVX2
# only, give the same logits) running MKL's AMD path. With MKL's Intel path (dni.mkl_path,
# which the dni command takes on AMD CPUs with AVX-512) they give the Intel bits. The noise
# and the step kernels (above) have the same bits on all of them. Per vendor: (LSTM, RNN)
# noisy logits. MKL's Intel kernels are per instruction set, so on an AVX2 CPU they give other
# bits again; and the training outputs and gradients also go through torch's own CPU kernels,
# which torch picks by instruction set (torch.backends.cpu.get_cpu_capability()): on Zen 3
# (AVX2) they differ from Zen 4's (AVX512). So the bits are pinned per (vendor that MKL
# sees, torch's capability). Training: at 1 thread (LSTM rows, LSTM strokes, RNN), then at 2.
_AMD_LOGITS = ["1367d6356708a28b", "6bac83c001ada566"]
PINNED_LOGITS = {("GenuineIntel", "AVX512"): ["117b33c9a5fd5949", "f98878634507c4b7"],
                 ("AuthenticAMD", "AVX512"): _AMD_LOGITS, ("AuthenticAMD", "AVX2"): _AMD_LOGITS}
PINNED_TRAINING = {
    ("GenuineIntel", "AVX512"): ["e9e5a7c27a595ac4", "2c5a452181ea5282", "8e39ebd3c49de62e",
                                 "69f14ef18b69fa4d", "34a59391ecfdfcbb", "d88efbd7dfd65504"],
    ("AuthenticAMD", "AVX512"): ["cf9da29014ca4354", "b9f80865ac8c7d6c", "470d61cedc1c407b",
                                 "1fd910033fb3a047", "e18c947a710ddaa8", "4e0151bf43610134"],
    ("AuthenticAMD", "AVX2"): ["d3d95c9902cc0678", "9711aece3f19a89d", "5896f8c36451e4cc",
                               "7342fb6134c9064a", "77d38e09c42fb655", "4d79e25bc73678ce"],
}


def _kernels() -> tuple[str, str]:
    # MKL's kernels follow its vendor check: with dni.mkl_path's library preloaded, AMD CPUs
    # run its Intel kernels and give the Intel bits (tests/test_mkl_path.py runs these so).
    vendor = "GenuineIntel" if mkl_path.preloaded() else dni.train.cpu_name().split(" ", 1)[0]
    return vendor, torch.backends.cpu.get_cpu_capability()


def _pinned(table: dict, key) -> list[str]:
    if key not in table:
        pytest.skip(f"no pinned bits recorded for {key}")
    return table[key]


@needs_fma
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_inference_logits_are_pinned(lib, loop_mode, threads):
    """Noisy logits of the compiled inference path, as the stored results were computed
    (the Intel hashes come from the code that evaluated the paper run; see PINNED_LOGITS)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        digests = []
        for arch in ("lstm", "rnn"):
            torch.manual_seed(1)
            model = build_model(arch, 28).eval()
            x = torch.rand(1000, 28, 28)
            with torch.no_grad():
                y = model(x, AdditiveGaussian(0.6), PhiloxGenerator(77))
            digests.append(hashlib.sha256(y.numpy().tobytes()).hexdigest()[:16])
    finally:
        torch.set_num_threads(before)
    assert digests == _pinned(PINNED_LOGITS, _kernels())


@needs_fma
def test_training_outputs_and_gradients_are_pinned(lib, loop_mode):
    """Outputs and gradients of the compiled training path (two forwards, one backward), at
    one and two threads, for the three cases: the stored models trained with
    --train-rng philox were computed with the Intel bits (recorded before the strokes
    projections were computed in the loop; see PINNED_LOGITS)."""
    before = torch.get_num_threads()
    digests = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for arch, inputs, steps in (("lstm", 28, 28), ("lstm", 2, 50), ("rnn", 28, 28)):
                torch.manual_seed(0)
                model = build_model(arch, inputs)
                g = torch.Generator().manual_seed(1)
                xs = [torch.rand(150, steps, inputs, generator=g) for _ in range(2)]
                y = torch.randint(0, 10, (150,), generator=g)
                outs, grads, _ = _loss_and_grads(model, xs, y, 0.7)
                blob = b"".join(t.numpy().tobytes() for t in (*outs, *grads))
                digests.append(hashlib.sha256(blob).hexdigest()[:16])
    finally:
        torch.set_num_threads(before)
    pinned = _pinned(PINNED_TRAINING, _kernels())
    if loop_mode == "python":  # its RNN backward is torch ops (1 - h*h rounded twice): other bits, same maths
        digests, pinned = digests[0:2] + digests[3:5], pinned[0:2] + pinned[3:5]
    assert digests == pinned
