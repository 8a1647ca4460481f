"""``dni bench``: throughput of dni's noisy inference and training against references.

Measured side by side in one process (same threads, same shapes):

* the fp32 GEMM peak (``F.linear`` on 4096x4096 matrices, oneDNN), and the rates of the
  products dni's compiled loop makes through its BLAS (fp32 and bf16, one core);
* fused, noise-free ``torch.nn.LSTM`` / ``nn.RNN`` inference (batch 1000) and training
  (batch 128, forward + backward + Adam);
* the straightforward noisy baseline: one pass per (sigma_val, repeat), an eager per-step
  cell computing ``x_t W_x^T + h W_h^T + b``, ``torch.randn`` noise;
* dni's noisy inference (shared input projection, Philox noise, fused step kernel), also
  with the ARS stream (``--rng ars``: other samples, the same statistics) where the CPU
  draws it (AES instructions), and
  dni's noisy training step, one model at a time and as a stack of 11 models trained as
  one (dni.stacking; model-steps/s);
* where the BLAS has a bf16 GEMM: dni's noisy inference at ``--precision bf16`` (not fp32,
  so it changes the numbers; see dni.precision), and the bf16 GEMM peak.

It also times one small op issued back to back (``launch_us``: what launch-bound work pays
per kernel). It ends with one JSON line of throughputs and ratios: ``noisy_vs_fused`` (goal >= 1),
``noisy_vs_naive`` (goal >= 5), ``train_vs_fused`` (goal >= 1), ``frac_of_peak``, and for
bf16 ``bf16_vs_fused`` and ``bf16_vs_naive`` (null where bf16 has no fast path), for ARS
``ars_vs_fused`` and ``ars_vs_naive`` (null where it has none).

On a GPU (``device="cuda"``) the same measurements run there, each timed call ending with
a synchronisation: the references are cuDNN's fused ``nn.LSTM``/``nn.RNN``, dni's noise is
the same Philox stream drawn by its Triton kernel (by torch ops without Triton), dni's
noisy passes of a batch run together (dni.evaluate.count_correct), and bf16 (fp32 products of rounded
operands there) and the processes-against-threads comparison, a CPU question, are left
out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
import torch.nn.functional as F

from dni import kernels, mkl_path
from dni.evaluate import count_correct
from dni.memory import keep_freed_memory
from dni.models import build_model
from dni.noise import AdditiveGaussian, ArsGenerator, PhiloxGenerator
from dni.precision import products_in
from dni.stacking import StackedRecurrent, batched
from dni.train import cpu_name, train_step

SHAPES = {"rows": (28, 28), "strokes": (50, 2)}
H = 128
STACK = 11  # members of a stacked training step: the paper's sigma_train grid


def _round(fn: Callable[[], object], min_time: float) -> float:
    """Seconds per call of ``fn``, called until ``min_time`` has passed (``fn`` waits for
    its own work: see :func:`_synced`)."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / n


def _time(fn: Callable[[], object], min_time: float = 1.0, reps: int = 3) -> float:
    """Best seconds per call over ``reps`` rounds of at least ``min_time`` each."""
    return _time_all({"fn": fn}, min_time, reps)["fn"]


def _time_all(fns: dict[str, Callable[[], object]], min_time: float = 1.0, reps: int = 3) -> dict[str, float]:
    """Best seconds per call of each function, over ``reps`` rounds that take the functions
    in turn: a machine that slows down or speeds up for a while (a shared VM does, by 10-20%
    over seconds) then affects all of them alike, and their ratios stay true."""
    for fn in fns.values():
        fn()  # warm-up: first-call allocations, kernel builds, checks
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            best[name] = min(best[name], _round(fn, min_time))
    return best


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn``, then a wait for the work it queued on ``device`` (CUDA runs asynchronously)."""
    if device.type != "cuda":
        return fn

    def call() -> None:
        fn()
        torch.cuda.synchronize(device)

    return call


def gemm_peak(n: int = 4096, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
    """GFLOP/s of ``F.linear`` on n x n matrices of ``dtype``."""
    device = torch.device(device)
    a, w = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / _time(_synced(lambda: F.linear(a, w), device), 0.5) / 1e9


def normals(device: torch.device | str = "cpu", n: int = 1 << 22) -> dict[str, float]:
    """Samples/s of dni's Philox stream as passes draw it on ``device`` (the compiled kernel
    on a CPU, the Triton kernel on a GPU where Triton is installed), of the same stream in
    torch ops, of ``torch.randn``, and (``ars``, where the CPU's library draws it) of the
    ARS stream."""
    device = torch.device(device)
    gen, ars, out = PhiloxGenerator(0), ArsGenerator(0), torch.empty(n, device=device)
    fns = {"dni": lambda: gen.add_normal_(out, 1.0, overwrite=True),
           "torch_ops": lambda: kernels.normal_torch(n, 0, 0, device),
           "randn": lambda: torch.randn(n, device=device)}
    if has_fast_ars(device):
        fns["ars"] = lambda: ars.add_normal_(out, 1.0, overwrite=True)
    t = _time_all({name: _synced(fn, device) for name, fn in fns.items()}, 0.5)
    return {name: n / seconds for name, seconds in t.items()}


def loop_products(rows: int = kernels.CACHE_ROWS) -> dict[str, float | None]:
    """GFLOP/s of the products dni's compiled CPU loop makes, on one core: ``rows`` states
    (one sub-block of a thread's rows) times W_h^T, (H, 4H), through the BLAS the loop
    calls, in fp32 (sgemm) and, where the BLAS has one, bf16 (its bf16 GEMM, the operands
    rounded as the loop rounds them). The GEMM peaks above go through ``F.linear``, whose
    kernels (oneDNN's) the loop cannot call; on some CPUs they are much faster in bf16.
    None where the compiled kernels or the BLAS's GEMM are missing."""
    lib = kernels.library()
    if lib is None or not lib.blas:
        return {"fp32": None, "bf16": None}
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(rows, H, generator=gen), torch.randn(4 * H, H, generator=gen)
    w16, out = w.to(torch.bfloat16), torch.empty(rows, 4 * H)
    fns = {"fp32": lambda: lib.dni_blas_mm(1, a.data_ptr(), w.data_ptr(), out.data_ptr(), rows, 4 * H, H)}
    if has_fast_bf16():
        fns["bf16"] = lambda: lib.dni_blas_mm_bf16(a.data_ptr(), w16.data_ptr(), out.data_ptr(), rows, 4 * H, H)
    with kernels.torch_single_threaded():
        t = _time_all(fns, 0.5)
    flops = 2 * rows * 4 * H * H
    return {"fp32": flops / t["fp32"] / 1e9, "bf16": flops / t["bf16"] / 1e9 if "bf16" in t else None}


def launch_overhead(device: torch.device | str = "cpu", ops: int = 1000) -> float:
    """Seconds per small op (an in-place add on 1,024 numbers), ``ops`` of them issued
    back to back and waited for once: what launch-bound work pays per kernel (on a GPU the
    launch, on a CPU torch's dispatch). Stacked training steps and noisy passes launch the
    numbers of kernels that ``scripts/count-launches.py`` counts."""
    device = torch.device(device)
    t = torch.zeros(1024, device=device)

    def issue() -> None:
        for _ in range(ops):
            t.add_(1.0)

    return _time(_synced(issue, device), 0.5) / ops


def has_fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether dni's compiled CPU loop has a bf16 GEMM (see dni.precision). On a GPU, bf16
    runs as fp32 products of rounded operands, which is not meant to be faster."""
    if torch.device(device).type != "cpu":
        return False
    lib = kernels.library()
    return lib is not None and bool(lib.bf16)


def has_fast_ars(device: torch.device | str = "cpu") -> bool:
    """Whether dni's compiled CPU kernels draw the ARS stream here (AES instructions). On a
    GPU torch ops draw it, which is not meant to be fast."""
    return torch.device(device).type == "cpu" and kernels.draws(kernels.library(), "ars")


def naive_noisy(model, x: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """The straightforward implementation: everything per step, torch.randn noise."""
    i = model.input_size
    w_x, w_h = model.weight[:, :i], model.weight[:, i:]
    h = x.new_zeros(x.shape[0], model.hidden_size)
    c = torch.zeros_like(h)
    for t in range(x.shape[1]):
        pre = x[:, t] @ w_x.T + h @ w_h.T + model.bias
        pre = pre + sigma * torch.randn(pre.shape, generator=gen, device=pre.device)
        if model.arch == "lstm":
            i_, f_, g_, o_ = pre.chunk(4, 1)
            c = torch.sigmoid(f_) * c + torch.sigmoid(i_) * torch.tanh(g_)
            h = torch.sigmoid(o_) * torch.tanh(c)
        else:
            h = torch.tanh(pre)
    logits = model.fc(h)
    return logits + sigma * torch.randn(logits.shape, generator=gen, device=logits.device)


def _flops(arch: str, steps: int, inputs: int) -> float:
    """Multiply-add FLOPs of one sequence (input + recurrent products + output layer)."""
    gates = 4 if arch == "lstm" else 1
    return 2 * steps * gates * H * (inputs + H) + 2 * H * 10


def inference(arch: str, data: str, batch: int = 1000, cells: int = 40, device: torch.device | str = "cpu") -> dict[str, float]:
    """Sequences/s of fused noise-free torch, the naive noisy loop and dni (per noisy pass).

    dni's passes share one input projection per batch, as the ``cells`` repeats of one
    (model, sigma_val) point do in an evaluation job (the paper's protocol: 40)."""
    device = torch.device(device)
    steps, inputs = SHAPES[data]
    torch.manual_seed(0)
    model = build_model(arch, inputs).eval().to(device)
    x = torch.rand(batch, steps, inputs).to(device)
    ref = (torch.nn.LSTM if arch == "lstm" else torch.nn.RNN)(inputs, H, batch_first=True).eval().to(device)
    noise = AdditiveGaussian(0.5)
    gen = torch.Generator(device).manual_seed(0)

    y = torch.zeros(batch, dtype=torch.int64, device=device)

    def dni_cells(precision: str, stream=PhiloxGenerator):  # as dni.evaluate.run_cells: one projection, many noisy passes (together on a GPU)
        with products_in(model, precision):
            xp = model.project(x)
            count_correct(model, xp, y, noise, [stream(k) for k in range(cells)], inline=model.inline_projection(x, xp))

    fns = {"fused": lambda: model.fc(ref(x)[0][:, -1]), "naive": lambda: naive_noisy(model, x, 0.5, gen),
           "dni": lambda: dni_cells("fp32")}
    if has_fast_bf16(device):
        fns["dni_bf16"] = lambda: dni_cells("bf16")
    if has_fast_ars(device):
        fns["dni_ars"] = lambda: dni_cells("fp32", ArsGenerator)
    with torch.no_grad():
        t = _time_all({name: _synced(fn, device) for name, fn in fns.items()})
    t_dni = t["dni"] / cells
    other = {name: batch * cells / t[name] if name in t else None for name in ("dni_bf16", "dni_ars")}
    return {"fused": batch / t["fused"], "naive": batch / t["naive"], "dni": batch / t_dni,
            "dni_gflops": batch * _flops(arch, steps, inputs) / t_dni / 1e9, **other}


def training(arch: str, data: str, batch: int = 128, device: torch.device | str = "cpu") -> dict[str, float]:
    """Training steps/s (forward + backward + Adam) of fused torch and of dni with noise."""
    device = torch.device(device)
    steps, inputs = SHAPES[data]
    torch.manual_seed(0)
    x, y = torch.rand(batch, steps, inputs).to(device), torch.randint(0, 10, (batch,)).to(device)
    ref = (torch.nn.LSTM if arch == "lstm" else torch.nn.RNN)(inputs, H, batch_first=True).to(device)
    fc = torch.nn.Linear(H, 10).to(device)
    opt_ref = torch.optim.Adam([*ref.parameters(), *fc.parameters()])

    def step_ref():
        loss = F.cross_entropy(fc(ref(x)[0][:, -1]), y)
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.step()

    model = build_model(arch, inputs).to(device)
    opt = torch.optim.Adam(model.parameters())
    noise = AdditiveGaussian(0.5)

    stack = StackedRecurrent([model] * STACK, [k / (STACK - 1) for k in range(STACK)]).to(device)  # a sweep's sigma_train grid
    opt_stack = torch.optim.Adam(stack.parameters())

    philox, torch_gen = PhiloxGenerator(0), torch.Generator(device).manual_seed(0)
    everyone = list(range(STACK))
    fns = {"fused": step_ref, "dni": lambda: train_step(model, opt, x, y, philox, 1.0, noise=noise),  # dni.train's step
           "dni_autograd": lambda: train_step(model, opt, x, y, torch_gen, 1.0, noise=noise),
           "stacked": lambda: train_step(stack, opt_stack, x, y, torch_gen, 1.0, everyone, batched(device))}
    t = _time_all({name: _synced(fn, device) for name, fn in fns.items()})
    rates = {name: 1 / seconds for name, seconds in t.items()}
    rates["stacked"] *= STACK  # model-steps/s
    return rates


def _worker_throughput(args) -> dict[str, float]:
    arch, data, threads = args
    torch.set_num_threads(threads)
    return inference(arch, data)


def workers(arch: str = "lstm", data: str = "rows") -> dict[str, float]:
    """Whole-machine throughput of dni's noisy pass and of fused noise-free torch:
    1 process x 2 threads against 2 processes x 1 thread (summed; both processes run
    the same measurements at the same time)."""
    ctx = get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        one = pool.submit(_worker_throughput, (arch, data, 2)).result()
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        two = list(pool.map(_worker_throughput, [(arch, data, 1)] * 2))
    return {"1x2": one["dni"], "2x1": sum(r["dni"] for r in two),
            "fused_1x2": one["fused"], "fused_2x1": sum(r["fused"] for r in two)}


def run(threads: int | None = None, quick: bool = False, with_workers: bool = True, log=print,
        device: torch.device | str = "cpu") -> dict:
    """Run every measurement on ``device``; return the JSON-able summary."""
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()  # as dni train does; it helps fused torch as much (one process)
    result: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "kernels": kernels.available(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "cpu": cpu_name(),
                    "mkl_path": mkl_path.describe(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    n = 2048 if quick else 4096
    peak = gemm_peak(n, device=device)
    result["gemm_peak_gflops"] = peak
    fast_bf16 = has_fast_bf16(device)
    result["gemm_peak_bf16_gflops"] = gemm_peak(n, torch.bfloat16, device) if fast_bf16 else None
    bf16_peak = f"{result['gemm_peak_bf16_gflops']:.0f} GFLOP/s" if fast_bf16 else "n/a (no bf16 GEMM in the BLAS)"
    log(f"on {result['device']} ({result['cpu']}): fp32 GEMM peak (F.linear): {peak:.0f} GFLOP/s with {torch.get_num_threads()} thread(s); "
        f"compiled kernels: {kernels.available()}; bf16 GEMM peak: {bf16_peak}; MKL's code path: {result['mkl_path']}; "
        f"torch's CPU kernels: {result['cpu_capability']}")
    if device.type == "cpu":
        loop = result["loop_gemm_gflops"] = loop_products()
        if loop["fp32"] is not None:
            bf16_loop = f"{loop['bf16']:.0f} GFLOP/s" if loop["bf16"] else "n/a"
            log(f"the compiled loop's products ({kernels.CACHE_ROWS}x{H} times {H}x{4 * H}, one core, its BLAS): "
                f"fp32 {loop['fp32']:.0f} GFLOP/s, bf16 {bf16_loop}")
    result["launch_us"] = launch_overhead(device) * 1e6
    log(f"one small op, issued back to back: {result['launch_us']:.1f} µs")
    rates = normals(device)
    result["normals_per_s"] = rates
    drawn_by = "compiled kernel"
    if device.type != "cpu":
        from dni import gpu_philox

        drawn_by = "Triton kernel" if gpu_philox.available(device) else "torch ops"
    log(f"N(0,1) samples/s: dni's Philox stream {rates['dni'] / 1e9:.2f} G ({drawn_by}), "
        f"the same stream in torch ops {rates['torch_ops'] / 1e9:.2f} G, torch.randn {rates['randn'] / 1e9:.2f} G"
        + (f"; dni's ARS stream {rates['ars'] / 1e9:.2f} G" if "ars" in rates else ""))
    log(f"{'shape':16s} {'fused torch':>12s} {'naive noisy':>12s} {'dni noisy':>12s} {'vs fused':>9s} {'vs naive':>9s} {'% peak':>7s} "
        f"{'dni bf16':>10s} {'vs fused':>9s} {'vs naive':>9s}   (sequences/s, batch 1000; bf16 changes the numbers)")
    cases = [("lstm", "rows"), ("lstm", "strokes"), ("rnn", "rows")]
    for arch, data in cases:
        r = inference(arch, data, device=device)
        r.update(noisy_vs_fused=r["dni"] / r["fused"], noisy_vs_naive=r["dni"] / r["naive"], frac_of_peak=r["dni_gflops"] / peak)
        bf16 = r["dni_bf16"]
        r.update(bf16_vs_fused=bf16 / r["fused"] if bf16 else None, bf16_vs_naive=bf16 / r["naive"] if bf16 else None)
        ars = r["dni_ars"]
        r.update(ars_vs_fused=ars / r["fused"] if ars else None, ars_vs_naive=ars / r["naive"] if ars else None)
        result[f"infer_{arch}_{data}"] = r
        bf16_cols = f"{bf16:10.0f} {r['bf16_vs_fused']:9.2f} {r['bf16_vs_naive']:9.2f}" if bf16 else f"{'n/a':>10s} {'':9s} {'':9s}"
        log(f"{arch + ' ' + data:16s} {r['fused']:12.0f} {r['naive']:12.0f} {r['dni']:12.0f} {r['noisy_vs_fused']:9.2f} {r['noisy_vs_naive']:9.2f} "
            f"{100 * r['frac_of_peak']:6.1f}% {bf16_cols}")
    log(f"{'shape':16s} {'fused torch':>12s} {'dni noisy':>12s} {'ratio':>9s} {'autograd':>12s} {'ratio':>9s} {'stacked':>12s} {'vs autograd':>12s}   "
        f"(training steps/s, batch 128; dni: --train-rng philox, autograd: --train-rng torch, stacked: {STACK} models as one, "
        "model-steps/s, --train-rng torch)")
    for arch, data in cases:
        r = training(arch, data, device=device)
        r["train_vs_fused"] = r["dni"] / r["fused"]
        r["autograd_vs_fused"] = r["dni_autograd"] / r["fused"]
        r["stacked_vs_autograd"] = r["stacked"] / r["dni_autograd"]
        result[f"train_{arch}_{data}"] = r
        log(f"{arch + ' ' + data:16s} {r['fused']:12.1f} {r['dni']:12.1f} {r['train_vs_fused']:9.2f} "
            f"{r['dni_autograd']:12.1f} {r['autograd_vs_fused']:9.2f} {r['stacked']:12.1f} {r['stacked_vs_autograd']:12.2f}")
    if with_workers and device.type == "cpu":
        w = workers()
        result["workers_lstm_rows"] = w
        w["noisy_vs_fused_2x1"] = w["2x1"] / w["fused_2x1"]
        log(f"LSTM rows, whole machine (sequences/s): dni noisy 1 process x 2 threads {w['1x2']:.0f}, 2 processes x 1 thread "
            f"{w['2x1']:.0f} ({w['2x1'] / w['1x2']:.2f}x); fused torch {w['fused_1x2']:.0f} and {w['fused_2x1']:.0f}; "
            f"dni vs fused, both 2 x 1: {w['noisy_vs_fused_2x1']:.2f}")
    ars_rows = [(f"{a} {d}", result[f"infer_{a}_{d}"]) for a, d in cases if result[f"infer_{a}_{d}"]["dni_ars"]]
    if ars_rows:
        log(f"{'shape':16s} {'dni ars':>12s} {'vs fused':>9s} {'vs naive':>9s} {'vs philox':>10s}   "
            "(sequences/s, batch 1000, --rng ars: the ARS stream, other samples than philox)")
        for name, r in ars_rows:
            log(f"{name:16s} {r['dni_ars']:12.0f} {r['ars_vs_fused']:9.2f} {r['ars_vs_naive']:9.2f} {r['dni_ars'] / r['dni']:10.2f}")
    for key in ("noisy_vs_fused", "noisy_vs_naive", "frac_of_peak", "bf16_vs_fused", "bf16_vs_naive", "ars_vs_fused",
                "ars_vs_naive"):
        result[key] = {f"{a}_{d}": result[f"infer_{a}_{d}"][key] for a, d in cases}
    result["train_vs_fused"] = {f"{a}_{d}": result[f"train_{a}_{d}"]["train_vs_fused"] for a, d in cases}
    return result


def summary_line(result: dict) -> str:
    return json.dumps(result, sort_keys=True, default=float)
