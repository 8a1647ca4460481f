"""The LSTM cell's element-wise maths as one Triton kernel each way, for GPUs.

:meth:`dni.models.NoisyLSTM.step` takes the noisy pre-activations ``[i | f | g | o]`` and the
cell state to ``(h_t, c_t)``: in torch ops that is 9 element-wise kernels forward and 13
backward, each over a few hundred thousand numbers, which a GPU runs in far less time than
it takes to launch them. Training a stack of models (dni.stacking) and evaluating a point's
repeats together (:meth:`~dni.models.NoisyRecurrent.recur_repeats`) are bound by these
launches. Here the forward is one kernel (gates, cell update, output, and the activations
that the backward needs) and the backward is one kernel, wrapped as an autograd function;
the products and the noise stay where they are (dni.models, dni.noise).

The maths is the compiled CPU step's (``dni/csrc/philox_normal.c``): sigmoid(x) =
1 / (1 + exp(-x)) and tanh(x) = 2 sigmoid(2x) - 1 (exact in reals; in float32 within ~6e-8 of
tanh, absolutely, so relatively coarse for |x| << 1). It equals the torch ops up to float
rounding, not bit for bit, as everything computed on a GPU does (the stored results are
CPU results). Triton comes with the CUDA builds of torch; without it, or on a CPU, the torch
ops run. Before their first use on a GPU the kernels are checked once per process
(:func:`available`): they must compile, run and give the torch ops' values and gradients;
where they do not, a warning says why and the torch ops run. With ``TRITON_INTERPRET=1``
set before Triton is imported, the kernels run on CPU tensors through Triton's
interpreter (tests).
"""

from __future__ import annotations

import functools

import torch

from dni.gpu_triton import checked_once, triton, verified

if triton is not None:
    import triton.language as tl

BLOCK = 1024  # (row, unit) elements of the state per Triton program
#: Multiply-adds contracted into fused ones (a rounding apart from the torch ops either way;
#: said explicitly, as Triton's default changes between versions).
FP_FUSION = True


def available(pre: torch.Tensor) -> bool:
    """Whether :meth:`~dni.models.NoisyLSTM.step` takes :func:`lstm_cell` for ``pre``: on a
    GPU with Triton, in float32, once the kernels have passed :func:`self_check` there."""
    return (triton is not None and pre.device.type == "cuda" and pre.dtype == torch.float32
            and checked_once("lstm-cell", pre.device, self_check))


def self_check(device: torch.device) -> bool:
    """Whether the kernels compile and run on ``device`` and give the values and gradients
    of the torch ops (:func:`dni.models.lstm_gates`) for a small stacked cell; where they
    do not, a warning says why."""
    from dni.models import lstm_gates

    def check() -> bool:
        with torch.inference_mode(False), torch.enable_grad():  # also when first asked in an inference pass
            gen = torch.Generator().manual_seed(0)
            pre = (4 * torch.randn(3, 5, 4 * 37, generator=gen)).to(device).requires_grad_()  # a width no power of two
            c = torch.randn(3, 5, 37, generator=gen).to(device).requires_grad_()
            weights = [torch.randn(3, 5, 37, generator=gen).to(device) for _ in range(2)]
            results = []
            for cell in (lstm_cell, lstm_gates):
                h, c_new = cell(pre, c)
                loss = (h * weights[0]).sum() + (c_new * weights[1]).sum()
                results.append([h, c_new, *torch.autograd.grad(loss, (pre, c))])
        return all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(*results))

    return verified(check, "the Triton kernels of the LSTM cell are", "they compute other values than the torch ops",
                    "torch ops run the cell instead", device)


def lstm_cell(pre: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h_t, c_t)`` from pre-activations ``pre`` (..., 4H), gate order (i, f, g, o), and
    the cell state ``c`` (..., H), differentiable in both."""
    return _LSTMCell.apply(pre, c)


def _launch(kernel, c: torch.Tensor, *args, **constexprs) -> None:
    """``kernel`` over the (rows, hidden units) of a state shaped like ``c``: a 2-D grid of
    tiles, so that no program divides an index to find its row."""
    hidden = c.shape[-1]
    rows = c.numel() // hidden if hidden else 0
    if rows:
        grid, per_row, units = _tiles(rows, hidden)
        kernel[grid](*args, rows, hidden, **constexprs, ROWS=per_row, UNITS=units, enable_fp_fusion=FP_FUSION)


@functools.lru_cache(maxsize=256)
def _tiles(rows: int, hidden: int) -> tuple[tuple[int, int], int, int]:
    """``(grid, ROWS, UNITS)`` for a state of ``rows`` x ``hidden``: tiles of UNITS units
    (``hidden`` rounded up to a power of two, at most BLOCK) by ROWS rows. In integer
    maths, once per shape: a training step launches the kernels twice per time step, and
    its host time is what bounds it (triton.cdiv and next_power_of_2 cost microseconds
    per call from Python)."""
    units = min(1 << (hidden - 1).bit_length(), BLOCK)
    per_row = BLOCK // units
    return (-(-rows // per_row), -(-hidden // units)), per_row, units


def cell_forward(pre: torch.Tensor, c: torch.Tensor, h: torch.Tensor, c_new: torch.Tensor, act: torch.Tensor) -> None:
    """The LSTM cell outside autograd: ``h_t`` and ``c_t`` written into ``h`` and ``c_new``,
    and into ``act`` the activated gates ``[i | f | g | o]`` that :func:`cell_backward`
    needs (all three contiguous); by the forward kernel where :func:`available`, else by
    torch ops (the same maths up to rounding)."""
    if available(pre):
        _launch(_lstm_forward, c, pre.contiguous(), c.contiguous(), h, c_new, act, SAVE=True)
        return
    from dni.models import lstm_activations, lstm_update

    gates = lstm_activations(pre)
    h_t, c_t = lstm_update(gates, c)
    c_new.copy_(c_t)
    h.copy_(h_t)
    torch.cat(gates, dim=-1, out=act)


def cell_backward(act: torch.Tensor, c: torch.Tensor, c_new: torch.Tensor, dh: torch.Tensor, dc: torch.Tensor | None,
                  d_pre: torch.Tensor) -> torch.Tensor:
    """The gradient of the cell's pre-activations, written into ``d_pre`` (contiguous),
    and that of ``c_{t-1}``, returned, from those of ``h_t`` (``dh``) and ``c_t`` (``dc``;
    None: zero), given :func:`cell_forward`'s ``act``, ``c = c_{t-1}`` and ``c_new = c_t``:
    by the backward kernel where :func:`available`, else by torch ops."""
    if available(act):
        return _kernel_backward(act, c, c_new, dh, dc, d_pre)[1]
    i, f, g, o = act.chunk(4, dim=-1)
    tc = torch.tanh(c_new)
    dc_all = dh * o * (1 - tc * tc)  # through h = o tanh(c_t), plus the next step's gradient of c_t
    if dc is not None:
        dc_all = dc_all + dc
    torch.cat((dc_all * g * i * (1 - i), dc_all * c * f * (1 - f), dc_all * i * (1 - g * g), dh * tc * o * (1 - o)), dim=-1,
              out=d_pre)
    return dc_all * f


def _kernel_backward(act, c, c_new, dh, dc, d_pre=None):
    d_pre = torch.empty_like(act) if d_pre is None else d_pre
    d_c = torch.empty_like(c)
    dh = dh.contiguous()
    _launch(_lstm_backward, c, act, c, c_new, dh, dh if dc is None else dc.contiguous(), d_pre, d_c, HAS_DC=dc is not None)
    return d_pre, d_c


class _LSTMCell(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: torch.Tensor, c: torch.Tensor):
        pre, c = pre.contiguous(), c.contiguous()
        h, c_new = torch.empty_like(c), torch.empty_like(c)
        save = any(ctx.needs_input_grad)
        act = torch.empty_like(pre) if save else h  # i, f, g, o after their activations; unused otherwise
        _launch(_lstm_forward, c, pre, c, h, c_new, act, SAVE=save)
        if save:
            ctx.save_for_backward(act, c, c_new)
            ctx.set_materialize_grads(False)  # an output without a gradient comes as None, not zeros
        return h, c_new

    @staticmethod
    def backward(ctx, dh: torch.Tensor | None, dc: torch.Tensor | None):
        act, c, c_new = ctx.saved_tensors
        d_pre, d_c = _kernel_backward(act, c, c_new, torch.zeros_like(c) if dh is None else dh, dc)
        return d_pre, d_c if ctx.needs_input_grad[1] else None


if triton is not None:

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _tile(rows, hidden, ROWS: tl.constexpr, UNITS: tl.constexpr):
        """This program's tile: the offsets of its (row, unit) elements in the state, those of
        their input-gate pre-activations (row * 4H + unit), and which of them exist."""
        row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
        unit = (tl.program_id(1) * UNITS + tl.arange(0, UNITS))[None, :]
        return row * hidden + unit, row * (4 * hidden) + unit, (row < rows) & (unit < hidden)

    @triton.jit
    def _lstm_forward(pre_ptr, c_ptr, h_ptr, c_new_ptr, act_ptr, rows, hidden, SAVE: tl.constexpr, ROWS: tl.constexpr,
                      UNITS: tl.constexpr):
        k, at, live = _tile(rows, hidden, ROWS, UNITS)
        i = _sigmoid(tl.load(pre_ptr + at, mask=live, other=0.0))
        f = _sigmoid(tl.load(pre_ptr + at + hidden, mask=live, other=0.0))
        g = 2.0 * _sigmoid(2.0 * tl.load(pre_ptr + at + 2 * hidden, mask=live, other=0.0)) - 1.0
        o = _sigmoid(tl.load(pre_ptr + at + 3 * hidden, mask=live, other=0.0))
        c = f * tl.load(c_ptr + k, mask=live, other=0.0) + i * g
        tl.store(c_new_ptr + k, c, mask=live)
        tl.store(h_ptr + k, o * (2.0 * _sigmoid(2.0 * c) - 1.0), mask=live)
        if SAVE:
            tl.store(act_ptr + at, i, mask=live)
            tl.store(act_ptr + at + hidden, f, mask=live)
            tl.store(act_ptr + at + 2 * hidden, g, mask=live)
            tl.store(act_ptr + at + 3 * hidden, o, mask=live)

    @triton.jit
    def _lstm_backward(act_ptr, c_ptr, c_new_ptr, dh_ptr, dc_ptr, d_pre_ptr, d_c_ptr, rows, hidden,
                       HAS_DC: tl.constexpr, ROWS: tl.constexpr, UNITS: tl.constexpr):
        k, at, live = _tile(rows, hidden, ROWS, UNITS)
        i = tl.load(act_ptr + at, mask=live, other=0.0)
        f = tl.load(act_ptr + at + hidden, mask=live, other=0.0)
        g = tl.load(act_ptr + at + 2 * hidden, mask=live, other=0.0)
        o = tl.load(act_ptr + at + 3 * hidden, mask=live, other=0.0)
        dh = tl.load(dh_ptr + k, mask=live, other=0.0)
        tc = 2.0 * _sigmoid(2.0 * tl.load(c_new_ptr + k, mask=live, other=0.0)) - 1.0
        dc = dh * o * (1.0 - tc * tc)  # through h = o tanh(c), plus the next step's gradient of c
        if HAS_DC:
            dc += tl.load(dc_ptr + k, mask=live, other=0.0)
        tl.store(d_pre_ptr + at, dc * g * i * (1.0 - i), mask=live)
        tl.store(d_pre_ptr + at + hidden, dc * tl.load(c_ptr + k, mask=live, other=0.0) * f * (1.0 - f), mask=live)
        tl.store(d_pre_ptr + at + 2 * hidden, dc * i * (1.0 - g * g), mask=live)
        tl.store(d_pre_ptr + at + 3 * hidden, dh * tc * o * (1.0 - o), mask=live)
        tl.store(d_c_ptr + k, dc * f, mask=live)
