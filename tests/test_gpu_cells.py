"""The LSTM cell's Triton kernels (dni.gpu_cells), which GPUs run the cell with: here
through Triton's interpreter on CPU tensors, against the torch ops of NoisyLSTM.step. (The
interpreter must be chosen before Triton is imported, hence a process of its own.)"""

import pytest
import torch

from dni import gpu_cells
from dni.models import build_model
from tests.helpers import compile_for_gpus, run_interpreted

pytestmark = pytest.mark.skipif(gpu_cells.triton is None, reason="Triton is not installed")

CHECKS = """
import torch
import torch.nn.functional as F
from dni import gpu_cells
from dni.models import NoisyLSTM, build_model
from dni.noise import AdditiveGaussian, PhiloxGenerator
from dni.stacking import StackedRecurrent

torch.manual_seed(0)
H = 8
ops = lambda pre: False
kernel = lambda pre: True


def close(a, b, tol=1e-6):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def reference(pre, c):  # the torch ops, in float64
    gpu_cells.available = ops
    h, c = NoisyLSTM.step(None, pre.double(), c.double())
    return h, c


# One cell: values and gradients against float64 torch ops, for one model's shape and a
# stack's, large pre-activations included, with each output's gradient present or absent.
for shape in [(5,), (3, 5), (2, 1)]:
    pre = (torch.randn(*shape, 4 * H) * 4).requires_grad_()
    c = torch.randn(*shape, H).requires_grad_()
    with torch.no_grad():
        pre[..., 0] = 95.0  # exp overflows in the other sign
        pre[..., H + 1] = -95.0
    h, c_new = gpu_cells.lstm_cell(pre, c)
    h_ref, c_ref = reference(pre, c)
    close(h.double(), h_ref), close(c_new.double(), c_ref)
    dh, dc = torch.randn_like(h), torch.randn_like(c)
    for with_h, with_c in [(True, True), (True, False), (False, True)]:
        loss = lambda h, c: (h * dh.to(h.dtype)).sum() * with_h + (c * dc.to(c.dtype)).sum() * with_c
        got = torch.autograd.grad(loss(h, c_new), (pre, c), retain_graph=True)
        want = torch.autograd.grad(loss(h_ref, c_ref), (pre, c), retain_graph=True)
        for a, b in zip(got, want):
            close(a.double(), b.double(), 2e-6)

# A state whose width is no power of two: the kernels' tiles are wider than it.
pre, c = torch.randn(3, 4 * 5).requires_grad_(), torch.randn(3, 5).requires_grad_()
h, c_new = gpu_cells.lstm_cell(pre, c)
h_ref, c_ref = reference(pre, c)
close(h.double(), h_ref), close(c_new.double(), c_ref)
for a, b in zip(torch.autograd.grad((h + c_new).sum(), (pre, c)), torch.autograd.grad((h_ref + c_ref).sum(), (pre, c))):
    close(a.double(), b.double(), 2e-6)

# Only pre-activations that need a gradient (the first step's zero cell state does not).
pre = torch.randn(4, 4 * H).requires_grad_()
h, _ = gpu_cells.lstm_cell(pre, torch.zeros(4, H))
(g,) = torch.autograd.grad(h.sum(), pre)
h_ref, _ = reference(pre, torch.zeros(4, H))
(g_ref,) = torch.autograd.grad(h_ref.sum(), pre)
close(g.double(), g_ref.double())
with torch.no_grad():  # inference: nothing saved, outputs without a graph
    h, c_new = gpu_cells.lstm_cell(pre, torch.zeros(4, H))
    assert not h.requires_grad and not c_new.requires_grad

# Where NoisyLSTM.step takes it: a model's noisy training pass, a stack's, and the repeats
# of a point run together give what the torch ops give, gradients included.
model = build_model("lstm", 3, hidden_size=H)
x, y = torch.rand(6, 5, 3), torch.randint(0, 10, (6,))
stack = StackedRecurrent([model] * 3, [0.0, 0.3, 0.6])


def trained(module, run):
    module.zero_grad(set_to_none=True)
    out = run()
    F.cross_entropy(out.flatten(0, -2), y.repeat(out.numel() // out.shape[-1] // len(y))).backward()
    return [out.detach()] + [p.grad.clone() for p in module.parameters()]


for module, run in [(model, lambda: model(x, AdditiveGaussian(0.5), torch.Generator().manual_seed(2))),
                    (stack, lambda: stack(x, torch.Generator().manual_seed(1)))]:
    gpu_cells.available = kernel
    got = trained(module, run)
    gpu_cells.available = ops
    for a, b in zip(got, trained(module, run)):
        close(a, b, 1e-5)

# A stack's batched forms (forced here): its recurrence as one autograd node, with the
# kernels' forward and backward, gives what autograd over the loop gives, and what the
# node gives with the torch ops.
import dni.stacking

dni.stacking.batched = lambda device: True
run = lambda: stack(x, torch.Generator().manual_seed(1))
gpu_cells.available = kernel
node = trained(stack, run)
dni.stacking.RECURRENCE_NODE = False
for a, b in zip(node, trained(stack, run)):
    close(a, b, 1e-5)
dni.stacking.RECURRENCE_NODE = True
gpu_cells.available = ops
for a, b in zip(node, trained(stack, run)):
    close(a, b, 1e-5)
dni.stacking.batched = lambda device: False

PhiloxGenerator.draws_ahead_on = staticmethod(lambda device: True)
with torch.no_grad():
    xp = model.project(x)
    gpu_cells.available = kernel
    got = model.recur_repeats(xp, AdditiveGaussian(0.4), [PhiloxGenerator(k) for k in range(4)])
    gpu_cells.available = ops
    close(got, model.recur_repeats(xp, AdditiveGaussian(0.4), [PhiloxGenerator(k) for k in range(4)]), 1e-5)
# The check each process runs before it first uses the kernels on a device passes.
with torch.no_grad():  # also when first asked in an inference pass
    assert gpu_cells.self_check(torch.device("cpu"))
print("ok")
"""


def test_the_cell_kernels_give_the_torch_ops_values_and_gradients():
    run_interpreted(CHECKS)


@pytest.mark.parametrize("flag", [True, False])
@pytest.mark.parametrize("units", [128, 8])
def test_the_cell_kernels_compile_for_the_gpus(flag, units):
    tile = {"ROWS": gpu_cells.BLOCK // units, "UNITS": units}
    ints = {"rows": "i32", "hidden": "i32", **dict.fromkeys(tile, "constexpr")}
    compile_for_gpus(gpu_cells._lstm_forward, {**dict.fromkeys(["pre_ptr", "c_ptr", "h_ptr", "c_new_ptr", "act_ptr"], "*fp32"),
                                               **ints, "SAVE": "constexpr"}, {"SAVE": flag, **tile}, gpu_cells.FP_FUSION)
    compile_for_gpus(gpu_cells._lstm_backward,
                     {**dict.fromkeys(["act_ptr", "c_ptr", "c_new_ptr", "dh_ptr", "dc_ptr", "d_pre_ptr", "d_c_ptr"], "*fp32"),
                      **ints, "HAS_DC": "constexpr"}, {"HAS_DC": flag, **tile}, gpu_cells.FP_FUSION)


def test_the_tiles_are_those_of_tritons_own_helpers():
    """gpu_cells._tiles, in integer maths once per shape, against triton.next_power_of_2 and
    triton.cdiv: every unit and row covered, no tile wider than BLOCK."""
    triton = gpu_cells.triton
    for rows in (1, 2, 7, 128, 1000, 11 * 128, 40 * 1000):
        for hidden in (1, 2, 5, 8, 37, 128, 1000, 1024, 1025, 1500):
            units = min(triton.next_power_of_2(hidden), gpu_cells.BLOCK)
            per_row = gpu_cells.BLOCK // units
            grid = (triton.cdiv(rows, per_row), triton.cdiv(hidden, units))
            assert gpu_cells._tiles(rows, hidden) == (grid, per_row, units)
            assert grid[0] * per_row >= rows and grid[1] * units >= hidden and per_row * units == gpu_cells.BLOCK


def test_the_lstm_step_takes_the_cell_kernels_where_available_and_never_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_cells, "lstm_cell", lambda pre, c: calls.append(pre.device) or (pre, c))
    model = build_model("lstm", 3, hidden_size=8)
    pre = torch.randn(2, 32)
    assert not gpu_cells.available(pre)
    h, c = model.step(pre, torch.zeros(2, 8))
    assert calls == [] and h.shape == (2, 8)
    monkeypatch.setattr(gpu_cells, "available", lambda pre: True)
    model.step(pre, torch.zeros(2, 8))
    assert calls == [torch.device("cpu")]


def test_kernels_that_fail_or_miscompute_are_not_used_and_a_warning_says_why(monkeypatch):
    """The self-check before the first use on a device: a kernel that cannot compile or
    launch, or that computes other values, leaves the cell to the torch ops."""
    from types import SimpleNamespace

    from dni.models import lstm_gates

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PTX .version 9.9 does not support .target sm_99\nmore lines")
            return launch

    monkeypatch.setattr(gpu_cells, "_lstm_forward", Broken())
    with pytest.warns(RuntimeWarning, match="LSTM cell are not used on cpu .RuntimeError: PTX .version 9.9"):
        assert gpu_cells.self_check(torch.device("cpu")) is False
    monkeypatch.setattr(gpu_cells, "lstm_cell", lambda pre, c: lstm_gates(pre * 1.001, c))
    with pytest.warns(RuntimeWarning, match="other values than the torch ops"):
        assert gpu_cells.self_check(torch.device("cpu")) is False
    checks = []
    monkeypatch.setattr(gpu_cells, "triton", object())  # as where Triton is installed
    monkeypatch.setattr("dni.gpu_triton._outcomes", {})
    monkeypatch.setattr(gpu_cells, "self_check", lambda device: checks.append(device) or False)
    gpu = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    assert not gpu_cells.available(gpu) and not gpu_cells.available(gpu)
    assert checks == [torch.device("cuda", 0)]  # once per process and device
    assert not gpu_cells.available(SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)) and len(checks) == 1
