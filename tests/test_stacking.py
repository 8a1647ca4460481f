"""Stacked training (dni.stacking): the sigma_train members of a seed trained as one model,
each getting exactly what training it alone gives."""

import dataclasses

import pytest
import torch

from dni.errors import DivergenceError, SpecError
from dni.executors import JobFailures, LocalExecutor
from dni.jobs import train_stack_job
from dni.models import build_model
from dni.spec import EvalSpec, TrainSpec
from dni.stacking import StackedRecurrent, stack_groups, stackable, why_not
from dni.store import Store
from dni.sweep import SweepSpec, run_sweep
from dni.train import train, train_stack
from tests.test_cli import TINY, run

BASE = TrainSpec(arch="lstm", data="rows", epochs=2, limit_train=300, val_size=60, batch_size=32)


def members(base=BASE, sigmas=(0.0, 0.4, 1.0)):
    return [dataclasses.replace(base, sigma_train=s) for s in sigmas]


def same_training(a, b) -> None:
    """Two results of one spec: the same weights, history (but wall times), epoch and accuracies."""
    assert a.spec == b.spec
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in r.history] for r in (a, b)]
    assert strip[0] == strip[1]
    assert (a.best_epoch, a.val_accuracy, a.test_accuracy) == (b.best_epoch, b.val_accuracy, b.test_accuracy)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("arch,data", [("lstm", "rows"), ("lstm", "strokes"), ("rnn", "rows")])
def test_a_stack_trains_each_member_bit_for_bit_as_it_trains_alone(fixture_data, arch, data, threads):
    """Same products (each member's input projection and output layer its own GEMM), the
    same noise samples scaled per member, the same losses, per-member clipping and
    element-wise Adam."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        specs = members(dataclasses.replace(BASE, arch=arch, data=data))
        together = train_stack(list(reversed(specs)))  # any order in, results in that order
        for spec, stacked in zip(reversed(specs), together):
            same_training(train(spec), stacked)
            assert stacked.meta["stack"]["members"] == [specs[0].model_id, specs[2].model_id, specs[1].model_id]  # noise-free first
            assert stacked.meta["wall_time_s"] == pytest.approx(stacked.meta["stack"]["wall_time_s"] / 3)
    finally:
        torch.set_num_threads(before)


def test_a_stack_of_philox_members_draws_its_noise_ahead_with_the_same_bits(fixture_data, monkeypatch):
    """The GPU's way, on the CPU: Philox through torch ops (no compiled kernels), each
    training pass's samples drawn ahead in one go; each member equals training it alone."""
    from dni import kernels
    from dni.noise import PhiloxGenerator

    monkeypatch.setattr(kernels, "library", lambda: None)
    monkeypatch.setattr(PhiloxGenerator, "draws_ahead_on", staticmethod(lambda device: True))
    monkeypatch.setattr("dni.train.stackable", lambda spec, device: True)
    prefetched = []
    real_prefetch = PhiloxGenerator.prefetch
    monkeypatch.setattr(PhiloxGenerator, "prefetch", lambda self, n, device: (prefetched.append(n), real_prefetch(self, n, device)))
    specs = members(dataclasses.replace(BASE, rng="philox", epochs=1, limit_train=200))
    together = train_stack(specs)
    assert prefetched and set(prefetched) >= {28 * 32 * 4 * 128 + 32 * 10}  # one per training batch (and pass)
    for spec, stacked in zip(specs, together):
        same_training(train(spec), stacked)


def close_training(a, b) -> None:
    """Two results of one spec that differ by float rounding: close weights and accuracies."""
    assert a.spec == b.spec
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-4)
    assert [len(r.history) for r in (a, b)] == [len(a.history)] * 2
    for x, y in zip(a.history, b.history):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        for key in ("val_accuracy", "val_accuracy_clean"):
            assert abs(x[key] - y[key]) <= 2 / 60  # a digit near a class boundary may flip
    assert abs(a.test_accuracy - b.test_accuracy) <= 0.01


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_the_batched_forms_of_a_gpu_stack_give_each_member_its_training_to_rounding(fixture_data, monkeypatch, arch):
    """Off a CPU a stack adds the noise with one addcmul, takes all members' losses as one
    cross-entropy, clips them in a few kernels and runs its validation and test passes for
    all members at once (dni.stacking.batched): here forced on the CPU, each member still
    trains as it trains alone, to float rounding; a member that diverges still stops alone."""
    import dni.train

    forced, alone = [], []
    monkeypatch.setattr("dni.stacking.batched", lambda device: forced.append(device) or True)
    monkeypatch.setattr("dni.train.batched", lambda device: forced.append(device) or True)
    monkeypatch.setattr("dni.train.stackable", lambda spec, device: True)
    real_accuracy = dni.train.accuracy
    monkeypatch.setattr("dni.train.accuracy", lambda *args, **kwargs: alone.append(1) or real_accuracy(*args, **kwargs))
    specs = members(dataclasses.replace(BASE, arch=arch, epochs=2))
    together = train_stack(specs)
    assert forced and not alone  # no member's pass of its own
    for spec, stacked in zip(specs, together):
        close_training(train(spec), stacked)
    monkeypatch.setattr("dni.stacking.add_stacked_gaussian", _nan_for_member(1))
    together = train_stack(specs)
    assert isinstance(together[1], DivergenceError) and "epoch 1, batch 1" in str(together[1])
    for k in (0, 2):
        close_training(train(specs[k]), together[k])


def test_a_stack_measures_each_members_accuracy_in_one_pass(fixture_data):
    """stacking.accuracies: every member's accuracy under its own training noise, with the
    samples each member's own pass draws from a copy of the generator, or noise-free; the
    logits to float rounding (a model's own inference pass adds its noise, and runs
    noise-free, in other kernels)."""
    from dni.data import load_dataset
    from dni.noise import make_noise
    from dni.stacking import accuracies
    from dni.train import accuracy

    sigmas = (0.0, 0.3, 1.5)
    models = [train(dataclasses.replace(BASE, epochs=1, limit_train=150, sigma_train=s)).model for s in sigmas]
    stack = StackedRecurrent(models, sigmas)
    ds = load_dataset("rows", "test", limit=250)
    noisy = accuracies(stack, ds.x, ds.y, torch.Generator().manual_seed(7), batch_size=100)
    clean = accuracies(stack, ds.x, ds.y, None, batch_size=100)
    with torch.no_grad():
        logits = stack(ds.x, torch.Generator().manual_seed(7))
    for k, (model, sigma) in enumerate(zip(models, sigmas)):
        alone = accuracy(model, ds, make_noise("additive", sigma), torch.Generator().manual_seed(7), batch_size=100)
        assert abs(noisy[k] - alone) <= 2 / 250
        with torch.no_grad():
            own = model(ds.x, make_noise("additive", sigma), torch.Generator().manual_seed(7))
        torch.testing.assert_close(logits[k], own, rtol=1e-4, atol=1e-4)
        assert abs(clean[k] - accuracy(model, ds, make_noise("additive", 0.0), None)) <= 2 / 250
    with torch.no_grad():
        spread = (logits - stack(ds.x, None, noisy=False)).abs().amax((1, 2)).tolist()
    assert noisy[0] == clean[0] and spread[0] == 0 < spread[1] < spread[2]  # each member's own sigma


@pytest.mark.parametrize("arch,inputs", [("lstm", 28), ("lstm", 2), ("rnn", 28)])
def test_a_stacks_recurrence_node_gives_the_loops_values_and_gradients(monkeypatch, arch, inputs):
    """stacking._Recurrence (the batched forms' recurrence as one autograd node, with a
    hand-written backward) against autograd over the per-step loop: the same logits and,
    to rounding, the same gradients, noisy and noise-free members alike."""
    import dni.stacking

    monkeypatch.setattr("dni.stacking.batched", lambda device: True)
    torch.manual_seed(0)
    stack = StackedRecurrent([build_model(arch, inputs, hidden_size=16) for _ in range(3)], [0.0, 0.3, 1.0])
    x = torch.rand(5, 7, inputs)
    weights = torch.randn(3, 5, 10)
    results, applied = [], []
    real = dni.stacking._Recurrence.apply
    monkeypatch.setattr(dni.stacking._Recurrence, "apply", lambda *args: applied.append(1) or real(*args))
    for node in (True, False):
        monkeypatch.setattr("dni.stacking.RECURRENCE_NODE", node)
        stack.zero_grad(set_to_none=True)
        logits = stack(x, torch.Generator().manual_seed(3))
        (logits * weights).sum().backward()
        results.append([logits.detach()] + [p.grad.clone() for p in stack.parameters()])
    assert applied == [1]
    (logits, *grads), (want, *expected) = results
    assert torch.equal(logits, want)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads)


def _nan_for_member(k):
    import dni.stacking

    real = dni.stacking.add_stacked_gaussian

    def noisy(pre, sigmas, noiseless, generator, batched=False):
        out = real(pre, sigmas, noiseless, generator, batched)
        return torch.cat((out[:k], out[k:k + 1] * float("nan"), out[k + 1:]))

    return noisy


def test_a_diverging_member_stops_alone_and_the_others_train_on(fixture_data, monkeypatch):
    specs = members()
    monkeypatch.setattr("dni.stacking.add_stacked_gaussian", _nan_for_member(1))
    together = train_stack(specs)
    assert isinstance(together[1], DivergenceError) and "epoch 1, batch 1" in str(together[1]) and "sigma_train=0.4" in str(together[1])
    for k in (0, 2):  # (a model trained alone does not use the stacked noise)
        same_training(train(specs[k]), together[k])


def test_a_stack_job_saves_the_others_and_reports_the_diverged(tmp_path, fixture_data, monkeypatch):
    import dni.stacking

    specs = members()
    real = dni.stacking.add_stacked_gaussian
    monkeypatch.setattr("dni.stacking.add_stacked_gaussian", _nan_for_member(2))
    outcomes = train_stack_job(tmp_path / "job", specs)
    assert [o.trained for o in outcomes] == [True, True, False]
    assert outcomes[2].error and "diverged" in outcomes[2].error
    assert Store(tmp_path / "job").model_ids() == sorted(s.model_id for s in specs[:2])
    sweep = SweepSpec(BASE, (0.0, 0.4, 1.0), (0,), EvalSpec(sigma_val=(0.0,), repeats=1, limit_test=20))
    store = Store(tmp_path / "sweep")
    with pytest.raises(JobFailures, match=f"1 job\\(s\\) failed.*train {specs[2].model_id}: training diverged"):
        run_sweep(store, sweep, LocalExecutor(jobs=1, stack=3))
    assert store.model_ids() == sorted(s.model_id for s in specs[:2])
    monkeypatch.setattr("dni.stacking.add_stacked_gaussian", real)
    report = run_sweep(store, sweep, LocalExecutor(jobs=1, stack=3))  # the rerun trains the missing member alone
    assert report.trained == 1 and len(store.model_ids()) == 3


def test_a_stack_job_trains_only_the_members_not_in_the_store(tmp_path, fixture_data):
    specs = members()
    first = train_stack_job(tmp_path, specs[1:2])
    assert [o.trained for o in first] == [True]
    weights = (Store(tmp_path).model_dir(specs[1].model_id) / "weights.safetensors").read_bytes()
    outcomes = train_stack_job(tmp_path, specs)
    assert [o.trained for o in outcomes] == [True, False, True]
    assert (Store(tmp_path).model_dir(specs[1].model_id) / "weights.safetensors").read_bytes() == weights
    assert [o.trained for o in train_stack_job(tmp_path, specs)] == [False] * 3


def test_only_models_that_differ_in_sigma_train_alone_stack(fixture_data):
    with pytest.raises(SpecError, match="differ in sigma_train alone"):
        train_stack([BASE, dataclasses.replace(BASE, sigma_train=0.5, seed=1)])
    with pytest.raises(SpecError, match="differ in sigma_train alone"):  # Philox on CPU: the compiled path
        train_stack(members(dataclasses.replace(BASE, rng="philox")))
    with pytest.raises(ValueError, match="noise-free members first"):
        StackedRecurrent([train(dataclasses.replace(BASE, epochs=1, limit_train=100)).model] * 2, [0.5, 0.0])


def test_stack_groups_split_each_seed_evenly_and_leave_the_rest_alone():
    sweep = SweepSpec(BASE, tuple(k / 10 for k in range(11)), (0, 1), EvalSpec())
    specs = sweep.train_specs()
    # On a CPU: one model per job unless asked.
    assert stack_groups(specs, "cpu") == [[s] for s in specs]
    groups = stack_groups(specs, "cpu", size=4)
    assert [len(g) for g in groups] == [4, 3, 4, 4, 3, 4]
    assert all(len({s.seed for s in g}) == 1 for g in groups)
    assert sorted(s.model_id for g in groups for s in g) == sorted(s.model_id for s in specs)
    # On GPUs: each seed's members in one stack per GPU, noise-free first.
    groups = stack_groups(specs, "cuda", parts=2)
    assert [len(g) for g in groups] == [6, 5, 6, 5] and groups[0][0].sigma_train == 0.0
    assert [len(g) for g in stack_groups(specs, "cuda")] == [11, 11]
    reversed_specs = [s for s in reversed(specs) if s.seed == 0]
    assert [s.sigma_train for s in stack_groups(reversed_specs, "cuda")[0]][:2] == [0.0, 1.0]
    # What does not stack trains alone.
    odd = [dataclasses.replace(s, noise="multiplicative") for s in specs[:3]] + [dataclasses.replace(BASE, arch="gru")]
    assert stack_groups(odd, "cuda") == [[s] for s in odd]
    assert not stackable(dataclasses.replace(BASE, rng="philox"), "cpu") and stackable(dataclasses.replace(BASE, rng="philox"), "cuda")
    assert not stackable(dataclasses.replace(BASE, sites="cell"), "cuda")
    assert "train-rng torch" in why_not(dataclasses.replace(BASE, rng="philox"), "cpu")
    assert "gru" in why_not(dataclasses.replace(BASE, arch="gru"), "cuda") and why_not(BASE, "cpu") is None


def test_a_stack_asked_for_models_that_cannot_stack_says_why(tmp_path, fixture_data):
    args = ["sweep", "--arch", "rnn", "--sigma-train", "0,1", "--sigma-val", "0", "--repeats", "1", "--limit-test", "40", *TINY,
            "--jobs", "1", "--store", tmp_path / "s"]
    result = run(*args, "--stack", 2, "--train-rng", "philox")
    assert result.exit_code == 0 and "--stack 2: these models train one at a time: on a CPU only --train-rng torch" in result.output
    assert not any("stack" in Store(tmp_path / "s").read_meta(mid) for mid in Store(tmp_path / "s").model_ids())
    result = run(*args[:-2], "--store", tmp_path / "t", "--stack", 2)
    assert result.exit_code == 0 and "one at a time" not in result.output


def test_sweep_with_stacks_stores_what_one_at_a_time_stores(tmp_path, fixture_data):
    args = ["sweep", "--arch", "rnn", "--sigma-train", "0,0.5,1", "--sigma-val", "0,1", "--repeats", "1", "--limit-test", "40", *TINY]
    for k in (1, 2):
        result = run(*args, "--stack", k, "--store", tmp_path / f"s{k}", "--jobs", "1")
        assert result.exit_code == 0, result.output
    one, two = Store(tmp_path / "s1"), Store(tmp_path / "s2")
    assert one.model_ids() == two.model_ids() and len(one.model_ids()) == 3
    for mid in one.model_ids():
        assert (one.model_dir(mid) / "weights.safetensors").read_bytes() == (two.model_dir(mid) / "weights.safetensors").read_bytes()
    stacked = [mid for mid in two.model_ids() if "stack" in two.read_meta(mid)]
    assert len(stacked) == 2  # three members over stacks of at most two: [0, 0.5] and [1]
    (sweep,) = (one.root / "sweeps").iterdir()
    assert (sweep / "results.csv").read_text() == (two.root / "sweeps" / sweep.name / "results.csv").read_text()
