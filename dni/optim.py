"""One training update: gradient-norm clipping, then Adam, with torch's bits.

:func:`clip_and_step` is ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` followed by
``opt.step()``. Where the compiled kernels are loaded, the optimizer is a plain
``torch.optim.Adam`` (one parameter group, no weight decay, amsgrad, maximize, foreach,
fused, capturable or hooks) and every parameter is a contiguous fp32 CPU tensor, it
computes the clipping coefficient with torch's own ops and then scales each gradient and
applies Adam in one compiled pass per parameter (``dni_adam_step`` in
``dni/csrc/philox_normal.c``), instead of ~10 torch ops per parameter and the Python
around them. The pass reproduces each of torch's roundings, including the square root
torch takes from MKL; it is used only after a check, once per process, that it gives the
parameters and optimizer state of torch's own step bit for bit (:func:`compiled_matches`).
The optimizer's state stays torch's (``step``, ``exp_avg``, ``exp_avg_sq``), so the two
ways can be mixed step by step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim import optimizer as torch_optimizer

from dni import kernels

#: False: always torch's clip_grad_norm_ and Adam.step (the compiled pass is then never used).
COMPILED = True
_matches: bool | None = None  # the once-per-process check of the compiled pass


def clip_and_step(opt: torch.optim.Optimizer, max_norm: float, members: Sequence[int] | None = None,
                  batched: bool = False) -> None:
    """Clip the gradients of ``opt``'s parameters to global 2-norm ``max_norm`` and take one
    optimizer step: the bits of ``clip_grad_norm_`` then ``opt.step()``.

    Args:
        members: for stacked models (dni.stacking), whose parameters hold one member per
            index of their first dimension: clip each listed member's gradients on their
            own, as ``clip_grad_norm_`` clips one model's. The others' are left as they are.
            Adam is element-wise, so each member then gets the step of its own optimizer.
        batched: with ``members``, compute all members' norms and scale all their gradients
            in a few kernels (:func:`clip_members`, the same maths up to rounding) instead of
            member by member with the bits of each alone (:func:`dni.stacking.batched`).
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    lib = kernels.library() if COMPILED else None
    compiled = lib is not None and lib.vs_sqrt and _compiled_applies(opt, params) and compiled_matches()
    if members is None and not compiled:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return
    grads = [p.grad for p in params if p.grad is not None]
    if members is None:
        coef = float(clip_coefficient(grads, max_norm))
    elif batched:
        clip_members(grads, members, max_norm)
        coef = 1.0
    else:
        with torch.no_grad():
            for k in members:
                member = [g[k] for g in grads]
                torch._foreach_mul_(member, clip_coefficient(member, max_norm))
        coef = 1.0
    if compiled:
        _compiled_step(lib, opt, params, coef)
    else:
        opt.step()


@torch.no_grad()
def clip_coefficient(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The factor ``clip_grad_norm_`` scales ``grads`` by, computed as it does (its total
    norm, then ``max_norm / (norm + 1e-6)`` clamped at 1), as a 0-dim tensor on the
    gradients' device (no synchronisation with a GPU)."""
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    return torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)


@torch.no_grad()
def clip_members(grads: list[torch.Tensor], members: Sequence[int], max_norm: float) -> None:
    """Scale the listed members' gradients (dim 0 = member) by their own clipping
    coefficient, :func:`clip_coefficient`'s maths for every member at once: ~15 kernels for
    any number of members, where member by member takes ~12 each."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2.0, dim=1) for g in grads], dim=1)
    coef = torch.clamp(float(max_norm) / (torch.linalg.vector_norm(norms, 2.0, dim=1) + 1e-6), max=1.0)
    if len(members) < len(coef):  # (a copy to the device, only once a member has diverged)
        listed = torch.zeros(len(coef), dtype=torch.bool)
        listed[list(members)] = True
        coef = torch.where(listed.to(coef.device, non_blocking=True), coef, 1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))


def _compiled_applies(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return False
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
        return False
    if torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks:
        return False
    group = opt.param_groups[0]
    if any(group.get(flag) for flag in ("amsgrad", "weight_decay", "maximize", "foreach", "fused", "capturable",
                                        "differentiable", "decoupled_weight_decay")):
        return False
    if any(isinstance(value, torch.Tensor) for value in (group["lr"], group["eps"], *group["betas"])):
        return False
    for p in params:
        if p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous():
            return False
        if p.grad is not None and (p.grad.dtype != torch.float32 or p.grad.is_sparse or not p.grad.is_contiguous()):
            return False
    return True


@torch.no_grad()
def _compiled_step(lib, opt: torch.optim.Adam, params: list[torch.Tensor], coef: float) -> None:
    """Scale each gradient by ``coef`` (the clipping) and take Adam's step, in one pass."""
    if all(p.grad is None for p in params):
        return
    group = opt.param_groups[0]
    lr, eps = group["lr"], group["eps"]
    beta1, beta2 = group["betas"]
    for p in params:
        if p.grad is None:
            continue
        state = opt.state[p]
        if not state:  # as Adam._init_group
            state["step"] = torch.tensor(0.0, dtype=torch_optimizer._get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step_t = state["step"]
        step_t += 1
        # The scalars as _single_tensor_adam computes them (Python floats, rounded to fp32
        # where its ops use them).
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if lib.dni_adam_step(p.data_ptr(), p.grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), p.numel(), coef,
                             1 - beta1, beta2, 1 - beta2, bias_correction2_sqrt, eps, -step_size):
            raise RuntimeError("dni_adam_step: no square-root function attached")


def compiled_matches() -> bool:
    """Whether the compiled pass gives torch's parameters and state bit for bit (checked
    once per process, over a few steps of parameters of odd sizes, with and without
    clipping; False where the kernels or MKL's square root are not available)."""
    global _matches
    if _matches is None:
        lib = kernels.library()
        _matches = bool(lib is not None and lib.vs_sqrt and _check(lib))
    return _matches


def _check(lib) -> bool:
    gen = torch.Generator().manual_seed(0)
    shapes = [(67, 45), (67,), (3000,), (10, 33)]  # odd sizes, and one over a compiled chunk
    init = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    steps = [[torch.randn(s, generator=gen) * scale for s in shapes] for scale in (0.3, 0.01, 2.0, 0.001)]
    results = []
    for compiled in (False, True):
        params = [p.clone().requires_grad_() for p in init]
        opt = torch.optim.Adam(params, lr=3e-3)
        for k, grads in enumerate(steps):
            opt.param_groups[0]["lr"] = 3e-3 * 0.95**k
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if compiled:
                _compiled_step(lib, opt, params, float(clip_coefficient([p.grad for p in params], 1.0)))
            else:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
        results.append([t for p in params for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])])
    return all(torch.equal(a, b) for a, b in zip(*results))
