import math

import pytest
import torch

import dni.train

from dni.errors import SpecError
from dni.models import build_model, count_parameters
from dni.noise import AdditiveGaussian
from dni.seeding import derive_seed
from dni.spec import TrainSpec

# Tables I, II and III of the paper.
PAPER_COUNTS = [("lstm", 28, 81674), ("lstm", 2, 68362), ("rnn", 28, 21386)]


@pytest.mark.parametrize("arch,inputs,count", PAPER_COUNTS)
def test_parameter_counts_match_the_paper(arch, inputs, count):
    assert count_parameters(build_model(arch, inputs)) == count


@pytest.mark.parametrize("arch,steps,inputs", [("lstm", 28, 28), ("lstm", 50, 2), ("rnn", 28, 28)])
def test_output_shape(arch, steps, inputs):
    model = build_model(arch, inputs)
    assert model(torch.rand(5, steps, inputs), AdditiveGaussian(0.5)).shape == (5, 10)


def _reference(arch, model):
    """The same network built from torch's fused modules (bias split as b_ih = b, b_hh = 0)."""
    h = model.hidden_size
    ref = (torch.nn.LSTM if arch == "lstm" else torch.nn.RNN)(model.input_size, h, batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(model.weight[:, : model.input_size])
        ref.weight_hh_l0.copy_(model.weight[:, model.input_size :])
        ref.bias_ih_l0.copy_(model.bias)
        ref.bias_hh_l0.zero_()
    return ref


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_noiseless_network_equals_torch_reference(arch):
    torch.manual_seed(0)
    model = build_model(arch, 28)
    ref = _reference(arch, model)
    x = torch.rand(16, 28, 28)
    with torch.no_grad():
        ours = model(x, AdditiveGaussian(0.0))
        seq, _ = ref(x)
        theirs = model.fc(seq[:, -1])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


class Recorder:
    """A noise model that records the shape of every pre-activation it perturbs."""

    is_noiseless = False

    def __init__(self):
        self.shapes = []

    def __call__(self, pre, generator):
        self.shapes.append(tuple(pre.shape))
        return pre


@pytest.mark.parametrize("arch,gates", [("lstm", 4), ("rnn", 1)])
def test_one_noise_draw_per_pre_activation_and_the_output_layer(arch, gates):
    model = build_model(arch, 28)
    rec = Recorder()
    model(torch.rand(3, 28, 28), rec)
    # one call per step on all gates together (W·[x, h] + b), then one on the logits
    assert rec.shapes == [(3, gates * 128)] * 28 + [(3, 10)]


def test_noise_enters_each_step_and_each_sample():
    model = build_model("lstm", 28)
    x = torch.rand(1, 28, 28).repeat(4, 1, 1)
    with torch.no_grad():
        out = model(x, AdditiveGaussian(0.5), torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in out}) == 4, "identical samples must see different noise"


def test_same_seed_same_output_different_seed_different_output():
    model = build_model("lstm", 2)
    x = torch.rand(4, 50, 2)
    noise = AdditiveGaussian(0.3)
    with torch.no_grad():
        a = model(x, noise, torch.Generator().manual_seed(5))
        b = model(x, noise, torch.Generator().manual_seed(5))
        c = model(x, noise, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_projection_is_reusable_across_noisy_passes():
    model = build_model("lstm", 28)
    x = torch.rand(4, 28, 28)
    with torch.no_grad():
        xp = model.project(x)
        before = xp.clone()
        model.recur(xp, AdditiveGaussian(1.0), torch.Generator().manual_seed(0))
    assert torch.equal(xp, before)


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_gradients_flow_to_every_parameter_with_noise(arch):
    model = build_model(arch, 28)
    loss = torch.nn.functional.cross_entropy(
        model(torch.rand(8, 28, 28), AdditiveGaussian(1.0), torch.Generator().manual_seed(0)), torch.arange(8)
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_unknown_arch_and_bad_input_shape():
    with pytest.raises(SpecError, match="unknown architecture"):
        build_model("transformer", 28)
    with pytest.raises(SpecError, match="expected input"):
        build_model("lstm", 28)(torch.rand(2, 28, 3), AdditiveGaussian(0.0))


def test_gru_equals_torch_gru_and_has_four_noisy_products():
    torch.manual_seed(0)
    model = build_model("gru", 28)
    assert count_parameters(model) == 3 * 128 * (28 + 128) + 3 * 128 + 1290
    ref = torch.nn.GRU(28, 128, batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(model.weight[:, :28])
        ref.weight_hh_l0.copy_(model.weight[:, 28:])
        ref.bias_ih_l0.copy_(model.bias)
        ref.bias_hh_l0.zero_()
        x = torch.rand(8, 28, 28)
        torch.testing.assert_close(model(x, AdditiveGaussian(0.0)), model.fc(ref(x)[0][:, -1]), rtol=1e-5, atol=1e-5)
    rec = Recorder()
    model(torch.rand(3, 28, 28), rec)
    assert rec.shapes == [(3, 256), (3, 128), (3, 128)] * 28 + [(3, 10)]
    loss = model(torch.rand(4, 28, 28), AdditiveGaussian(0.5), torch.Generator().manual_seed(0)).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_gru_does_not_modify_the_shared_projection():
    model = build_model("gru", 2)
    with torch.no_grad():
        xp = model.project(torch.rand(4, 50, 2))
        before = xp.clone()
        model.recur(xp, AdditiveGaussian(1.0), torch.Generator().manual_seed(0))
    assert torch.equal(xp, before)


@pytest.mark.parametrize("arch", ["lstm", "rnn", "gru"])
def test_noise_sites(arch):
    torch.manual_seed(0)
    model = build_model(arch, 28)
    x = torch.rand(6, 28, 28)
    noise = AdditiveGaussian(1.0)

    def run(sites, seed=0):
        states = []
        with torch.no_grad():
            out = model(x, noise, torch.Generator().manual_seed(seed), observer=lambda t, h, c: states.append(h.clone()), sites=sites)
        return out, torch.stack(states)

    clean, clean_states = run("none")
    with torch.no_grad():
        assert torch.allclose(clean, model(x, AdditiveGaussian(0.0)), atol=1e-6)
    out_only, out_states = run("out")
    assert torch.equal(out_states, clean_states) and not torch.equal(out_only, clean)
    cell_only, cell_states = run("cell")
    assert not torch.equal(cell_states, clean_states)
    first = model.site_names()[0]
    one, _ = run(first)
    assert not torch.equal(one, clean)
    with pytest.raises(SpecError, match="unknown noise site"):
        run("q")


def test_some_gates_only_leaves_the_other_gates_exact():
    torch.manual_seed(0)
    model = build_model("lstm", 28)
    seen = []

    class Spy:
        is_noiseless = False

        def __call__(self, pre, generator):
            seen.append(pre.shape)
            return pre + 1.0  # a visible perturbation

    pre = torch.zeros(2, 512)
    out = model._noisy(pre, Spy(), None, frozenset({"f", "o"}), model.gate_names)
    assert out[:, :128].eq(0).all() and out[:, 128:256].eq(1).all() and out[:, 256:384].eq(0).all() and out[:, 384:].eq(1).all()


@pytest.mark.parametrize("arch", ["lstm", "rnn", "gru"])
def test_keras_initialisation(arch):
    torch.manual_seed(0)
    model = build_model(arch, 28)
    model.reset_parameters("keras")
    h, n_in = model.hidden_size, model.input_size
    w_x, w_h = model.weight[:, :n_in], model.weight[:, n_in:]
    # Orthonormal rows of Keras' (H, gates*H) recurrent kernel = orthonormal columns here.
    torch.testing.assert_close(w_h.t() @ w_h, torch.eye(h), atol=1e-5, rtol=0)
    limit = math.sqrt(6 / (n_in + w_x.shape[0]))
    biggest = float(w_x.detach().abs().max())
    assert 0.9 * limit < biggest <= limit
    expected_bias = torch.zeros_like(model.bias)
    if arch == "lstm":
        expected_bias[h:2 * h] = 1.0  # forget gate, the second block
    assert torch.equal(model.bias.detach(), expected_bias)
    assert torch.equal(model.fc.bias.detach(), torch.zeros(10))
    with pytest.raises(SpecError):
        model.reset_parameters("xavier")


def test_init_is_part_of_the_model_id_only_when_not_the_default():
    assert TrainSpec().model_id == TrainSpec(init="torch").model_id
    assert TrainSpec(init="keras").model_id != TrainSpec().model_id
    with pytest.raises(SpecError):
        TrainSpec(init="xavier")


def test_models_are_initialised_once_from_the_first_draws_of_their_seed():
    # Values of the first draws for seed derive_seed(0, "init"), as every stored torch-
    # initialised model was drawn: W first, then b, then the output layer.
    torch.manual_seed(derive_seed(0, "init"))
    model = build_model("lstm", 28, init="torch")
    assert model.weight.flatten()[:3].tolist() == [-0.01859224960207939, -0.053821008652448654, 0.052843086421489716]
    assert model.fc.weight.flatten()[:2].tolist() == [0.05533868446946144, 0.020897112786769867]


@pytest.mark.parametrize("init", ["torch", "keras"])
def test_training_starts_from_the_weights_build_model_draws(init, fixture_data, monkeypatch):
    built, started = [], []
    real_build, real_adam = dni.train.build_model, torch.optim.Adam

    def spy_build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    def spy_adam(params, **kwargs):
        params = list(params)
        started.append([p.detach().clone() for p in params])
        return real_adam(params, **kwargs)

    monkeypatch.setattr(dni.train, "build_model", spy_build)
    monkeypatch.setattr(torch.optim, "Adam", spy_adam)
    dni.train.train(TrainSpec(arch="rnn", init=init, epochs=1, limit_train=60, val_size=20), fixture_data)
    assert len(built) == 1 and len(started) == 1
    assert all(torch.equal(a, b) for a, b in zip(built[0].values(), started[0]))
    torch.manual_seed(derive_seed(0, "init"))
    again = build_model("rnn", 28, init=init)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), built[0].values()))


@pytest.mark.parametrize("arch,inputs,steps", [("lstm", 28, 28), ("lstm", 2, 50), ("rnn", 28, 28), ("gru", 28, 28)])
def test_a_pass_drawing_its_noise_ahead_gives_the_same_logits_and_gradients(monkeypatch, arch, inputs, steps):
    """On a GPU, where Philox runs as torch ops, a noisy pass draws all its samples in one
    go (one per pre-activation element and logit) instead of ~150 small ops per step; the
    logits and their gradients are those of step-by-step draws. Here: the CPU's torch
    implementation of the stream, with drawing ahead switched on."""
    from dni import kernels
    from dni.noise import PhiloxGenerator

    monkeypatch.setattr(kernels, "library", lambda: None)
    monkeypatch.setattr(PhiloxGenerator, "draws_ahead_on", staticmethod(lambda device: True))
    torch.manual_seed(0)
    model = build_model(arch, inputs)
    x = torch.rand(40, steps, inputs)
    prefetched = []
    real_prefetch = PhiloxGenerator.prefetch
    monkeypatch.setattr(PhiloxGenerator, "prefetch", lambda self, n, device: (prefetched.append(n), real_prefetch(self, n, device)))
    gen = PhiloxGenerator(9)
    ahead = model(x, AdditiveGaussian(0.7), gen)
    draws = {"lstm": 4, "rnn": 1, "gru": 4}[arch]  # per state unit and step
    assert prefetched == [steps * 40 * draws * 128 + 40 * 10]
    assert gen._ahead is None and gen._ahead_end is None  # every sample drawn ahead was used
    monkeypatch.setattr(PhiloxGenerator, "prefetch", lambda self, n, device: None)
    direct = model(x, AdditiveGaussian(0.7), PhiloxGenerator(9))
    assert torch.equal(ahead, direct)
    g_ahead = torch.autograd.grad(ahead.sum(), model.weight)[0]
    g_direct = torch.autograd.grad(direct.sum(), model.weight)[0]
    assert torch.equal(g_ahead, g_direct)


def test_passes_draw_ahead_only_on_a_gpu():
    from dni.noise import PhiloxGenerator

    assert PhiloxGenerator.draws_ahead_on(torch.device("cuda")) and not PhiloxGenerator.draws_ahead_on(torch.device("cpu"))


@pytest.mark.parametrize("arch,inputs,steps", [("lstm", 28, 28), ("lstm", 2, 50), ("rnn", 28, 28)])
def test_passes_run_together_give_each_its_own_logits_and_stream_position(monkeypatch, arch, inputs, steps):
    """NoisyRecurrent.recur_repeats (a GPU's way to run the repeats of a point): pass r has
    the logits of recur() with generator r, bit for bit here (the CPU's torch ops), and
    leaves each stream where that pass would."""
    from dni import kernels
    from dni.noise import PhiloxGenerator

    monkeypatch.setattr(kernels, "library", lambda: None)
    torch.manual_seed(1)
    model = build_model(arch, inputs)
    xp = model.project(torch.rand(30, steps, inputs))
    noise = AdditiveGaussian(0.8)
    with torch.no_grad():
        gens = [PhiloxGenerator(seed) for seed in (11, 12, 13)]
        for g in gens:
            g.take(1000)  # streams already advanced by earlier batches
        assert not model.recurs_repeats(xp, noise, gens)  # on a CPU passes run one by one
        monkeypatch.setattr(PhiloxGenerator, "draws_ahead_on", staticmethod(lambda device: True))
        assert model.recurs_repeats(xp, noise, gens) and not model.recurs_repeats(xp, AdditiveGaussian(0.0), gens)
        together = model.recur_repeats(xp, noise, gens)
        for seed, logits, g in zip((11, 12, 13), together, gens):
            alone = PhiloxGenerator(seed)
            alone.take(1000)
            assert torch.equal(logits, model.recur(xp, noise, alone))
            assert g.counter == alone.counter
        gens[0].take(4)
        assert not model.recurs_repeats(xp, noise, gens)  # streams out of step
