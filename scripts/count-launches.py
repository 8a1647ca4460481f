"""Kernel launches per unit of GPU work, counted on a CPU: a stacked training step of 11
models (batch 128) and one noisy inference pass (batch 1,000, one of a point's repeats run
together), for the LSTM on rows and strokes and the RNN.

On a GPU these small steps are bound by launching kernels, so their count, times a few
microseconds each, estimates the time until a GPU measures it. The GPU's paths are forced
here on CPU tensors: the torch ops dni runs on a GPU (no compiled CPU kernels), a stack's
batched forms (dni.stacking.batched) and the LSTM cell's Triton kernels (dni.gpu_cells),
which are not run but counted as one launch each. torch's profiler counts the other ops (those that call no
other op), views and allocations left out. A noisy pass's draw counts as one launch, as the
Triton kernel a GPU draws it with (dni.gpu_philox; the torch ops of the stream would be
~150).

    python scripts/count-launches.py            # the GPU's paths
    python scripts/count-launches.py --plain    # torch ops and member-by-member stacks
"""

import sys

import torch
import torch.nn.functional as F
from torch.profiler import profile

import dni.stacking
from dni import gpu_cells, kernels
from dni.bench import stacked_step
from dni.models import build_model
from dni.noise import AdditiveGaussian, PhiloxGenerator
from dni.stacking import StackedRecurrent

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


def _drawn(n, key, counter, device, out=None):  # stands in for the Triton draw: one launch
    launches[0] += 1
    return torch.empty(n, device=device) if out is None else out


class _Counted:  # stands in for a Triton kernel: counts its launches
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            launches[0] += 1
        return launch


if gpu_paths:
    gpu_cells.available = lambda pre: True
    gpu_cells._lstm_forward = gpu_cells._lstm_backward = _Counted()
kernels.normal_on = _drawn


def count(fn) -> int:
    fn()  # warm-up
    launches[0] = 0
    with profile() as prof:
        fn()
    # an op that calls no other op launches a kernel (but views and allocations)
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.name not in NOT_LAUNCHES
              and not any(child.name.startswith("aten::") for child in e.cpu_children))
    return ops + launches[0]


def main() -> None:
    torch.manual_seed(0)
    for arch, data, steps, inputs in (("lstm", "rows", 28, 28), ("lstm", "strokes", 50, 2), ("rnn", "rows", 28, 28)):
        model = build_model(arch, inputs)
        x, y = torch.rand(128, steps, inputs), torch.randint(0, 10, (128,))
        stack = StackedRecurrent([model] * MEMBERS, [k / (MEMBERS - 1) for k in range(MEMBERS)])
        opt, gen = torch.optim.Adam(stack.parameters()), torch.Generator().manual_seed(0)

        xp = model.project(torch.rand(1000, steps, inputs))

        def infer():  # one noisy pass as evaluation runs it on a GPU (recur_repeats)
            with torch.no_grad():
                model.recur_repeats(xp, AdditiveGaussian(0.5), [PhiloxGenerator(0)])

        print(f"{arch} {data}: stacked training step of {MEMBERS} models {count(lambda: stacked_step(stack, opt, x, y, gen, gpu_paths))} "
              f"launches; noisy pass over 1,000 sequences {count(infer)} ({steps} steps)", flush=True)


if __name__ == "__main__":
    main()
