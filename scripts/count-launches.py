"""Kernel launches per unit of GPU work, counted on a CPU: a stacked training step of 11
models (batch 128), the epoch's validation passes of those models (noisy and noise-free, per
batch of 1,000 digits) and one noisy inference pass (batch 1,000, one of a point's repeats
run together), for the LSTM on rows and strokes and the RNN.

On a GPU these small steps are bound by launching kernels, so their count, times a few
microseconds each, estimates the time until a GPU measures it. The GPU's paths are forced
here on CPU tensors: the torch ops dni runs on a GPU (no compiled CPU kernels), a stack's
batched forms (dni.stacking.batched) and the LSTM cell's Triton kernels (dni.gpu_cells),
which are not run but counted as one launch each. torch's profiler counts the other ops (those that call no
other op), views and allocations left out, and each of the optimizer's foreach ops as one launch, as
on a GPU (a CPU runs them tensor by tensor). A noisy pass's draw counts as one launch, as the
Triton kernel a GPU draws it with (dni.gpu_philox; the torch ops of the stream would be
~150). It also times how long this CPU takes to issue a stacked step's ops, with next to no
arithmetic in them: a floor under a GPU's step time.

    python scripts/count-launches.py            # the GPU's paths
    python scripts/count-launches.py --plain    # torch ops and member-by-member stacks
"""

import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import profile

import dni.stacking
from dni import gpu_cells, kernels
from dni.models import build_model
from dni.noise import AdditiveGaussian, PhiloxGenerator
from dni.stacking import StackedRecurrent, accuracies
from dni.train import train_step

NOT_LAUNCHES = {
    "aten::empty", "aten::view", "aten::as_strided", "aten::empty_strided", "aten::t", "aten::transpose", "aten::unsqueeze",
    "aten::select", "aten::slice", "aten::expand", "aten::reshape", "aten::detach", "aten::alias", "aten::chunk", "aten::split",
    "aten::unbind", "aten::permute", "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view", "aten::result_type",
    "aten::lift_fresh", "aten::item", "aten::_local_scalar_dense", "aten::narrow", "aten::empty_like", "aten::to", "aten::_to_copy",
    "aten::squeeze", "aten::flatten", "aten::contiguous", "aten::numpy_T", "aten::matrix_H", "aten::split_with_sizes",
    "aten::is_nonzero", "aten::set_",
}
MEMBERS = 11
gpu_paths = "--plain" not in sys.argv
kernels.library = lambda: None  # the torch ops, as on a GPU
dni.stacking.batched = lambda device: gpu_paths
PhiloxGenerator.draws_ahead_on = staticmethod(lambda device: True)  # passes draw ahead, repeats run together
launches = [0]


def _drawn(n, key, counter, device, out=None):  # stands in for the Triton draw: one launch (zeros, see _Counted)
    launches[0] += 1
    out = torch.empty(n, device=device) if out is None else out
    out.numpy().fill(0.0)
    return out


class _Counted:
    """Stands in for a Triton kernel: counts its launches, and writes zeros to its outputs
    (arguments ``outputs``), through numpy, which the profiler does not see: a training step
    on uninitialised memory could see a non-finite loss, and skip its backward pass."""

    def __init__(self, outputs: tuple[int, ...]):
        self.outputs = outputs

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            launches[0] += 1
            for k in self.outputs:
                args[k].detach().numpy().fill(0.0)
        return launch


if gpu_paths:
    gpu_cells.available = lambda pre: True
    gpu_cells._lstm_forward = _Counted(outputs=(2, 3, 4))  # h, c_new, act
    gpu_cells._lstm_backward = _Counted(outputs=(5, 6))  # d_pre, d_c
kernels.normal_on = _drawn


def _in_foreach(event) -> bool:
    while event.cpu_parent is not None:
        event = event.cpu_parent
        if event.name.startswith("aten::_foreach_"):
            return True
    return False


def count(fn) -> int:
    fn()  # warm-up
    launches[0] = 0
    with profile() as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    # an op that calls no other op launches a kernel (but views and allocations); a foreach
    # op, which a CPU runs tensor by tensor, is one launch on a GPU (the optimizer's)
    ops = sum(1 for e in events if e.name not in NOT_LAUNCHES and not _in_foreach(e)
              and (e.name.startswith("aten::_foreach_") or not any(c.name.startswith("aten::") for c in e.cpu_children)))
    return ops + launches[0]


def stacked(model) -> tuple[StackedRecurrent, object]:
    """A stack of MEMBERS copies of ``model`` over a sweep's sigma_train grid, and a
    function ``step(x, y)`` that takes one training step of it as dni.train does (Adam
    with foreach ops, a GPU's default)."""
    stack = StackedRecurrent([model] * MEMBERS, [k / (MEMBERS - 1) for k in range(MEMBERS)])
    opt, gen = torch.optim.Adam(stack.parameters(), foreach=True), torch.Generator().manual_seed(0)
    return stack, lambda x, y: train_step(stack, opt, x, y, gen, 1.0, list(range(MEMBERS)), gpu_paths)


def main() -> None:
    torch.manual_seed(0)
    for arch, data, steps, inputs in (("lstm", "rows", 28, 28), ("lstm", "strokes", 50, 2), ("rnn", "rows", 28, 28)):
        model = build_model(arch, inputs)
        x, y = torch.rand(128, steps, inputs), torch.randint(0, 10, (128,))
        stack, step = stacked(model)

        xp = model.project(torch.rand(1000, steps, inputs))

        def infer():  # one noisy pass as evaluation runs it on a GPU (recur_repeats)
            with torch.no_grad():
                model.recur_repeats(xp, AdditiveGaussian(0.5), [PhiloxGenerator(0)])

        xv, yv = torch.rand(1000, steps, inputs), torch.randint(0, 10, (1000,))
        alone = [stack.member(k) for k in range(MEMBERS)]

        def validate():  # an epoch's validation passes per 1,000 digits, noisy and clean, as dni.train runs them
            if gpu_paths:  # all members at once
                accuracies(stack, xv, yv, torch.Generator().manual_seed(1))
                accuracies(stack, xv, yv, None)
                return
            with torch.no_grad():
                for member, sigma in zip(alone, stack.sigmas.flatten().tolist()):
                    for noise in (AdditiveGaussian(sigma), AdditiveGaussian(0.0)):
                        (member(xv, noise, torch.Generator().manual_seed(1)).argmax(1) == yv).sum()

        launches = count(lambda: step(x, y))
        print(f"{arch} {data}: stacked training step of {MEMBERS} models {launches} launches; its validation passes per 1,000 "
              f"digits {count(validate)}; noisy pass over 1,000 sequences {count(infer)} ({steps} steps); "
              f"issuing the step's ops {issue_time(arch, steps, inputs) * 1e3:.2f} ms", flush=True)


def issue_time(arch: str, steps: int, inputs: int, rounds: int = 5, calls: int = 40) -> float:
    """Seconds per stacked training step spent issuing its ops, on this CPU's one thread:
    the same ops on a batch of 1 with 8 hidden units, next to no arithmetic (best of
    ``rounds``). A GPU's step cannot take less, since its host issues the same ops (and
    each launch costs it a little more than a CPU op's dispatch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, step = stacked(build_model(arch, inputs, hidden_size=8))
        x, y = torch.rand(1, steps, inputs), torch.randint(0, 10, (1,))
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                step(x, y)
            best = min(best, (time.perf_counter() - t0) / calls)
        return best
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
