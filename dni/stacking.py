"""Training several models as one: the sigma_train members of a sweep, stacked.

The models of one sweep seed differ only in sigma_train: they start from the same weights
(one init seed), see the same batches in the same order (one shuffle seed) and draw from
the same noise stream (one training-noise seed), each scaled by its own sigma_train. So
they can be trained as one model whose parameters gain a leading member dimension: every
matrix product becomes a batched one, every element-wise op runs once for all members,
and each step's noise is drawn once and scaled per member.

Each member gets the weights, history and accuracies of training it alone: on CPU bit for
bit (``tests/test_stacking.py``), since every product, noise draw, loss, clipping norm and
Adam update is the same operation on the same numbers; on a GPU up to float rounding. On a
GPU a training step of a small recurrent model is bound by kernel launches, and a stack
of M members costs about the launches of one; on a CPU the products are the cost, and a
stack is no faster than one model per worker process, so there it is off by default. Off
the CPU a stack also takes batched forms (:func:`batched`), among them its recurrence as
one autograd node with a hand-written backward (:class:`_Recurrence`).

What stacks: the LSTM and the vanilla RNN with additive noise on every product (the
paper's protocol). On CPU only with torch's training-noise generator: with Philox the
compiled training kernels are faster, and their results are the ones stored.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dni import gpu_cells
from dni.models import NoisyLSTM, NoisyRecurrent, NoisyRNN, plain_cell
from dni.noise import AdditiveGaussian, Generator, add_stacked_gaussian, draw_ahead
from dni.spec import TrainSpec

#: Architectures whose cell maths the stacked loop runs (their ``step`` is element-wise
#: along the last dimension).
STACKABLE = {"lstm": NoisyLSTM, "rnn": NoisyRNN}
#: False: a stack's batched forms train through autograd over the per-step loop instead of
#: :class:`_Recurrence` and its hand-written backward (the reference the tests hold it to).
RECURRENCE_NODE = True


def stackable(spec: TrainSpec, device: str | torch.device) -> bool:
    """Whether ``spec`` can be trained in a stack on ``device`` (see the module notes)."""
    return why_not(spec, device) is None


def why_not(spec: TrainSpec, device: str | torch.device) -> str | None:
    """Why ``spec`` cannot be trained in a stack on ``device``; None where it can."""
    if spec.arch not in STACKABLE:
        return f"the {spec.arch} has no stacked cell (lstm and rnn have)"
    if spec.noise != "additive" or spec.sites != "all":
        return "only additive noise on every product stacks"
    if torch.device(device).type == "cpu" and spec.rng != "torch":
        return "on a CPU only --train-rng torch stacks (with philox the compiled kernels train faster)"
    return None


def batched(device: str | torch.device) -> bool:
    """Whether a stack on ``device`` takes the batched forms of its input projection,
    noise, losses and clipping: one set of kernels for all members, the same maths up to
    rounding. Off a CPU, where they save launches (and a GPU rounds differently from one
    launch shape to another anyway); on a CPU each member keeps the bits of training
    alone, as the tests check."""
    return torch.device(device).type != "cpu"


def member_losses(logits: torch.Tensor, y: torch.Tensor, members: Sequence[int], batched: bool = False) -> torch.Tensor:
    """Cross-entropy of the listed members' logits (dim 0 = member) against ``y``: one
    loss per member, as a 1-D tensor; member by member (each the bits of its own
    ``F.cross_entropy``) or ``batched`` as one."""
    if batched:
        chosen = logits if len(members) == logits.shape[0] else logits[torch.tensor(members, device=logits.device)]
        each = F.cross_entropy(chosen.flatten(0, 1), y.repeat(len(members)), reduction="none")
        return each.view(len(members), -1).mean(1)
    each = logits.unbind(0)  # one gradient buffer for all members' logits
    return torch.stack([F.cross_entropy(each[k], y) for k in members])


def stack_key(spec: TrainSpec) -> TrainSpec:
    """Specs with the same key can share a stack: they differ only in sigma_train."""
    return dataclasses.replace(spec, sigma_train=0.0)


def stack_groups(specs: Sequence[TrainSpec], device: str | torch.device, size: int | None = None,
                 parts: int = 1) -> list[list[TrainSpec]]:
    """Training jobs for ``specs``: lists of specs to train together, in the order of ``specs``.

    Args:
        size: at most this many members per stack (1: every model alone). None: on a CPU 1;
            elsewhere each group of stackable specs split into ``parts`` stacks.
        parts: the GPUs the executor spreads its jobs over (used when ``size`` is None). A
            GPU's time goes to launching kernels, and a stack costs about the launches of
            one model, so one stack per GPU; more would only take turns on it.

    A group of n stackable specs becomes ceil(n / size) stacks of near-equal size, members
    with sigma_train = 0 first (:func:`order`). Specs that cannot stack train alone.
    """
    if size is None:
        size = 1 if torch.device(device).type == "cpu" else 0
    groups: dict[TrainSpec | int, list[TrainSpec]] = {}
    for i, spec in enumerate(specs):
        key = stack_key(spec) if size != 1 and stackable(spec, device) else i
        groups.setdefault(key, []).append(spec)
    jobs = []
    for members in groups.values():
        n = len(members)
        count = math.ceil(n / size) if size else min(n, max(parts, 1))
        bounds = [round(k * n / count) for k in range(count + 1)]
        jobs.extend(order(members[a:b]) for a, b in zip(bounds, bounds[1:]))
    return jobs


def order(specs: Sequence[TrainSpec]) -> list[TrainSpec]:
    """The members of a stack, noise-free ones (sigma_train = 0, which draw nothing) first."""
    return sorted(specs, key=lambda s: s.sigma_train != 0.0)


class StackedRecurrent(nn.Module):
    """M models of one architecture and shape as one; member k's parameters are slice k
    of each stacked parameter.

    Args:
        members: the models, noise-free ones first (:func:`order`). Copied; not modified.
        sigmas: each member's training noise strength.
    """

    def __init__(self, members: Sequence[NoisyRecurrent], sigmas: Sequence[float]):
        super().__init__()
        first = members[0]
        if not plain_cell(first) or any(type(m) is not type(first) for m in members):
            raise ValueError("a stack holds LSTMs or vanilla RNNs of one kind")
        if len(sigmas) != len(members) or list(sigmas) != sorted(sigmas, key=lambda s: s != 0.0):
            raise ValueError("one sigma per member, the noise-free members first")
        self.template = [copy.deepcopy(first)]  # in a list: not a submodule; member() copies it
        self.input_size, self.hidden_size = first.input_size, first.hidden_size
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in members]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in members]))
        self.fc_weight = nn.Parameter(torch.stack([m.fc.weight.detach() for m in members]))
        self.fc_bias = nn.Parameter(torch.stack([m.fc.bias.detach() for m in members]))
        self.noiseless = sum(s == 0.0 for s in sigmas)
        self.register_buffer("sigmas", torch.tensor([float(s) for s in sigmas], dtype=torch.float32).view(-1, 1, 1))
        self._noise = AdditiveGaussian(max(sigmas))  # only asked whether anything is drawn

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, generator: Generator, noisy: bool = True) -> torch.Tensor:
        """Every member's noisy logits, shape (members, batch, classes), for inputs of
        shape (batch, steps, input_size): the operations of :meth:`NoisyRecurrent.forward`
        (projection, recurrence, output layer, Eq. 2's noise) with a member dimension.
        ``noisy=False``: the noise-free logits (nothing drawn)."""
        self.template[0]._check_input(x)
        batch, steps, n_in = x.shape
        m, rows = self.weight.shape[:2]
        xt = x.transpose(0, 1).reshape(steps * batch, n_in)
        together = batched(x.device)
        if together:  # every member's input half in one product
            xp = torch.baddbmm(self.bias.unsqueeze(1), xt.expand(m, -1, -1), self.weight[:, :, :n_in].transpose(1, 2))
        else:
            # Each member's input half as its own product, as the single model computes it:
            # one product for all gives the same values, but not the same gradient bits (the
            # BLAS splits the long reduction of W_x's gradient differently for other widths).
            # (unbind, not indexing: its backward stacks the members' gradients in one go,
            # where each index would zero-fill a gradient of the whole stack)
            w_x = self.weight[:, :, :n_in].unbind(0)
            xp = torch.stack([torch.addmm(b, xt, w.t()) for b, w in zip(self.bias.unbind(0), w_x)])
        xp = xp.view(m, steps, batch, rows)
        w_h = self.weight[:, :, n_in:]
        noisy = noisy and self.noiseless < m
        if noisy:  # one draw per pre-activation element and per logit, shared by the members
            draw_ahead(generator, self._noise, steps * batch * rows + batch * self.fc_bias.shape[1], x.device)
        noise = (lambda pre: add_stacked_gaussian(pre, self.sigmas, self.noiseless, generator, together)) if noisy else None
        lstm = isinstance(self.template[0], NoisyLSTM)
        if together and RECURRENCE_NODE and torch.is_grad_enabled():  # training: the recurrence as one autograd node
            h = _Recurrence.apply(xp, w_h, lstm, noise)
        else:
            h = self._loop(xp, w_h, lstm, noise, together)
        if together:
            logits = torch.baddbmm(self.fc_bias.unsqueeze(1), h, self.fc_weight.transpose(1, 2))
        else:
            # Each member's output layer as nn.Linear computes it. Autograd then takes the
            # gradient of a whole (contiguous) weight as grad^T @ h, and that of a batched
            # product as h^T @ grad, then transposed: the same sums, but BLAS kernels may
            # order them differently (MKL does on AMD Zen 4, not on the Intel CPUs here).
            logits = torch.stack([F.linear(hk, w, b) for hk, w, b in zip(h.unbind(0), self.fc_weight.unbind(0),
                                                                            self.fc_bias.unbind(0))])
        return noise(logits) if noise is not None else logits

    def _loop(self, xp: torch.Tensor, w_h: torch.Tensor, lstm: bool, noise, together: bool) -> torch.Tensor:
        """Every member's last state, by the recurrence step by step (under autograd where
        it records)."""
        m, _, batch, _ = xp.shape
        h = xp.new_zeros(m, batch, self.hidden_size)
        c = xp.new_zeros(m, batch, self.hidden_size) if lstm else None
        step = self.template[0].step
        w_ht = w_h.transpose(1, 2) if together else None
        for t, xp_t in enumerate(xp.unbind(1)):
            if together:  # W_h transposed once, and no product of the first state, zero (values equal)
                pre = xp_t if t == 0 else torch.baddbmm(xp_t, h, w_ht)
            else:
                # w_h transposed at every step, as the single model does: autograd then sums the
                # steps' gradients in the same order.
                pre = torch.baddbmm(xp_t, h, w_h.transpose(1, 2))
            if noise is not None:
                pre = noise(pre)
            h, c = step(pre, c)
        return h

    def member(self, k: int) -> NoisyRecurrent:
        """Member ``k`` as a model of its own (a copy of its current weights)."""
        model = copy.deepcopy(self.template[0])
        with torch.no_grad():
            model.weight.copy_(self.weight[k])
            model.bias.copy_(self.bias[k])
            model.fc.weight.copy_(self.fc_weight[k])
            model.fc.bias.copy_(self.fc_bias[k])
        return model

    def member_finite(self, k: int) -> bool:
        return all(bool(torch.isfinite(p[k]).all()) for p in self.parameters())


class _Recurrence(torch.autograd.Function):
    """A stack's noisy recurrence in the batched forms, from the input projections ``xp``
    (members, steps, batch, rows) and W_h (members, rows, H) to every member's last state,
    with a hand-written backward. Forward, per step: the product (none for the zero first
    state), the noise, the cell (dni.gpu_cells' kernels where they are available). Backward,
    per step: the cell's gradient and one product for the previous state's; then one
    product over all steps for W_h's. The same maths as autograd over the loop, to rounding,
    but autograd records one node for the whole pass instead of several per step: on a GPU
    a training step is bound by the host, which issues its kernels one by one."""

    @staticmethod
    def forward(ctx, xp, w_h, lstm, noise):
        m, steps, batch, rows = xp.shape
        hidden = w_h.shape[2]
        w_ht = w_h.transpose(1, 2)
        hs = xp.new_empty(steps, m, batch, hidden)
        cs = xp.new_empty(steps + 1, m, batch, hidden) if lstm else None
        acts = xp.new_empty(steps, m, batch, rows) if lstm else None
        if lstm:
            cs[0].zero_()
        for t in range(steps):
            pre = xp[:, t] if t == 0 else torch.baddbmm(xp[:, t], hs[t - 1], w_ht)
            if noise is not None:
                pre = noise(pre)
            if lstm:
                gpu_cells.cell_forward(pre, cs[t], hs[t], cs[t + 1], acts[t])
            else:
                torch.tanh(pre, out=hs[t])
        ctx.lstm = lstm
        ctx.save_for_backward(w_h, hs, cs, acts)
        return hs[-1].clone()

    @staticmethod
    def backward(ctx, d_last):
        w_h, hs, cs, acts = ctx.saved_tensors
        steps, m, batch, hidden = hs.shape
        rows = w_h.shape[1]
        d_pre = hs.new_empty(steps, m, batch, rows)
        dh, dc = d_last, None
        for t in range(steps - 1, -1, -1):
            if ctx.lstm:
                dc = gpu_cells.cell_backward(acts[t], cs[t], cs[t + 1], dh, dc, d_pre[t])
            else:  # h = tanh(pre): autograd's own kernel for it, in place
                torch.ops.aten.tanh_backward.grad_input(dh, hs[t], grad_input=d_pre[t])
            if t:
                dh = torch.bmm(d_pre[t], w_h)
        # W_h's gradient: sum over steps t >= 1 of d_pre_t^T h_{t-1}, as one product per member
        before = hs[:-1].transpose(0, 1).reshape(m, (steps - 1) * batch, hidden)
        d_w_h = torch.bmm(d_pre[1:].transpose(0, 1).reshape(m, (steps - 1) * batch, rows).transpose(1, 2), before)
        return d_pre.transpose(0, 1), d_w_h, None, None


@torch.no_grad()
def accuracies(stack: StackedRecurrent, x: torch.Tensor, y: torch.Tensor, generator: Generator | None,
               batch_size: int = 1000) -> list[float]:
    """Every member's accuracy on inputs ``x`` (on the stack's device) with labels ``y``, in one
    pass of the stack per batch: under each member's own training noise, the samples
    ``generator`` gives (those each member's own pass with a copy of it draws), or with
    ``generator=None`` noise-free. The counts are read from the device once."""
    correct = torch.zeros(stack.members, dtype=torch.int64, device=x.device)
    for start in range(0, len(y), batch_size):
        logits = stack(x[start : start + batch_size], generator, noisy=generator is not None)
        correct += (logits.argmax(2) == y[start : start + batch_size]).sum(1)
    return [count / max(len(y), 1) for count in correct.tolist()]
