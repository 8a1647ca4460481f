"""The training update (gradient clipping, then Adam): the compiled pass gives torch's bits."""

import pytest
import torch

import dni.train
from dni import kernels, optim
from dni.spec import TrainSpec

SHAPES = [(512, 156), (512,), (10, 128), (10,), (37,), (3, 2049)]  # LSTM strokes/rows sizes, odd tails, > one chunk


def _run(compiled_steps, steps=120, max_norm=1.0, threads=1, **adam):
    """Parameters and Adam state after ``steps`` updates with gradients of changing scale
    (clipping active in some steps, not in others) and a decaying learning rate; step k is
    compiled where ``compiled_steps(k)``."""
    gen = torch.Generator().manual_seed(7)
    params = [(torch.randn(s, generator=gen) * 0.1).requires_grad_() for s in SHAPES]
    opt = torch.optim.Adam(params, lr=3e-3, **adam)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in range(steps):
            scale = 10.0 ** (-3 + 4 * torch.rand(1, generator=gen).item())
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * scale
            opt.param_groups[0]["lr"] = 3e-3 * 0.95 ** (k // 10)
            optim.COMPILED = compiled_steps(k)
            optim.clip_and_step(opt, max_norm)
    finally:
        optim.COMPILED = True
        torch.set_num_threads(before)
    return [p.detach() for p in params] + [opt.state[p][key] for p in params for key in ("exp_avg", "exp_avg_sq", "step")]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_compiled_pass_is_used_where_the_kernels_are(lib):
    assert lib.vs_sqrt, "torch's library exports no vsSqrt"
    assert optim.compiled_matches()


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_update_gives_torchs_bits(lib, threads, monkeypatch):
    calls = []
    real = optim._compiled_step
    monkeypatch.setattr(optim, "_compiled_step", lambda *a: calls.append(1) or real(*a))
    reference = _run(lambda k: False, threads=threads)
    assert not calls
    assert _equal(_run(lambda k: True, threads=threads), reference)
    assert len(calls) == 120
    # torch's and the compiled step share the optimizer state: they can alternate
    assert _equal(_run(lambda k: k % 3 == 1, threads=threads), reference)


def test_clipping_changes_the_update_as_torch_does(lib):
    assert not _equal(_run(lambda k: True, max_norm=0.05), _run(lambda k: True))
    assert _equal(_run(lambda k: True, max_norm=0.05), _run(lambda k: False, max_norm=0.05))


@pytest.mark.parametrize("adam", [dict(weight_decay=1e-4), dict(amsgrad=True), dict(foreach=True), dict(maximize=True)])
def test_other_adam_settings_take_torchs_step(lib, adam, monkeypatch):
    monkeypatch.setattr(optim, "_compiled_step", lambda *a: pytest.fail("compiled step used"))
    optim.clip_and_step(torch.optim.Adam([torch.zeros(3, requires_grad=True)], **adam), 1.0)
    assert _equal(_run(lambda k: True, steps=5, **adam), _run(lambda k: False, steps=5, **adam))


def test_optimizer_hooks_and_other_optimizers_take_torchs_step(lib, monkeypatch):
    monkeypatch.setattr(optim, "_compiled_step", lambda *a: pytest.fail("compiled step used"))
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    seen = []
    adam = torch.optim.Adam([p])
    adam.register_step_post_hook(lambda *a: seen.append("hook"))
    optim.clip_and_step(adam, 1.0)
    assert seen == ["hook"]
    optim.clip_and_step(torch.optim.SGD([p], lr=0.1), 1.0)
    assert not torch.equal(p.detach(), torch.zeros(3))


def test_a_square_root_that_misses_torchs_bits_is_never_used(lib, monkeypatch):
    monkeypatch.setattr(optim, "_matches", None)
    lib.dni_set_vs_sqrt(kernels._torch_symbol("vsTanh"))  # same signature, other values
    try:
        assert not optim.compiled_matches()
        assert _equal(_run(lambda k: True, steps=5), _run(lambda k: False, steps=5))
    finally:
        lib.dni_set_vs_sqrt(kernels._torch_symbol("vsSqrt"))
        optim._matches = None
    assert optim.compiled_matches()


def test_training_weights_do_not_depend_on_the_compiled_update(lib, fixture_data, monkeypatch):
    spec = TrainSpec(arch="rnn", sigma_train=0.3, rng="philox", epochs=2, limit_train=400, val_size=44)
    compiled = dni.train.train(spec, fixture_data)
    monkeypatch.setattr(optim, "COMPILED", False)
    plain = dni.train.train(spec, fixture_data)
    assert compiled.history == [dict(row, seconds=b["seconds"]) for row, b in zip(plain.history, compiled.history)]
    assert _equal(compiled.model.state_dict().values(), plain.model.state_dict().values())


@pytest.mark.parametrize("compiled", [True, False])
def test_stacked_members_each_get_the_update_of_their_own_optimizer(compiled, monkeypatch):
    """Stacked parameters (dim 0 = member, dni.stacking): each member's gradients clipped on
    their own, then one Adam step, gives every member the bits of its own clip_and_step;
    members not listed keep their gradients unclipped."""
    monkeypatch.setattr(optim, "COMPILED", compiled)
    gen = torch.Generator().manual_seed(3)
    members = 3
    init = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
    alone = [[p.clone().requires_grad_() for p in init] for _ in range(members)]
    opts = [torch.optim.Adam(ps, lr=3e-3) for ps in alone]
    stacked = [torch.stack([p] * members).requires_grad_() for p in init]
    opt = torch.optim.Adam(stacked, lr=3e-3)
    for k in range(30):
        grads = [[torch.randn(s, generator=gen) * 10.0 ** (-3 + 4 * torch.rand(1, generator=gen).item()) for s in SHAPES]
                 for _ in range(members)]
        for ps, o, gs in zip(alone, opts, grads):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            optim.clip_and_step(o, 1.0)
        for j, p in enumerate(stacked):
            p.grad = torch.stack([gs[j] for gs in grads])
        optim.clip_and_step(opt, 1.0, members=range(members))
    for m in range(members):
        assert _equal([p[m] for p in stacked], alone[m])
        assert _equal([opt.state[p][key][m] for p in stacked for key in ("exp_avg", "exp_avg_sq")],
                      [o_state[key] for o_state in (opts[m].state[p] for p in alone[m]) for key in ("exp_avg", "exp_avg_sq")])
    for p in stacked:
        p.grad = torch.full_like(p, 1e3)
    optim.clip_and_step(opt, 1.0, members=[1])
    assert all((p.grad[0] == 1e3).all() and (p.grad[1] < 1e3).all() for p in stacked)


def test_clipping_all_members_at_once_gives_each_its_own_coefficient():
    """optim.clip_members (a GPU stack's batched clipping): each listed member's gradients
    scaled by the clip_coefficient of its own, to rounding; members not listed untouched."""
    gen = torch.Generator().manual_seed(5)
    members = 4
    grads = [torch.randn(members, *s, generator=gen) for s in SHAPES]
    for g, scale in zip(grads, (10.0, 0.01, 1.0, 0.1)):
        g[1:3] *= scale  # members both above and below the threshold
    grads[0][3] *= 1e-4
    for listed in ([0, 1, 3], [0, 1, 2, 3]):
        given = [g.clone() for g in grads]
        want = [g.clone() for g in grads]
        for k in listed:
            member = [g[k] for g in want]
            torch._foreach_mul_(member, optim.clip_coefficient(member, 1.0))
        optim.clip_members(given, listed, 1.0)
        for g, w in zip(given, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=0.0)
        assert listed != [0, 1, 3] or all(torch.equal(g[2], w[2]) for g, w in zip(given, want))
