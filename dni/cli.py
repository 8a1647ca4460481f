"""The ``dni`` command line: thin wrappers that parse options and call plain functions.

Printing, exit codes and ``typer.Exit`` live here only; library code raises
:class:`~dni.errors.DniError` with a message meant for the user, which is printed as one
line (exit code 1) instead of a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from dni.errors import DniError, SpecError

app = typer.Typer(
    name="dni",
    help="Deep Noise Injection: train recurrent networks against noisy analog computation and evaluate them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

StoreOpt = Annotated[Path, typer.Option("--store", help="Checkpoint store directory.", envvar="DNI_STORE")]
DataDirOpt = Annotated[
    Optional[Path], typer.Option("--data-dir", help="Data directory (default: $DNI_DATA_DIR, else the user cache).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (cuda when available).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="Torch intra-op threads (default: torch's).")]
StackOpt = Annotated[Optional[int], typer.Option(
    "--stack", min=1, help="Models trained together as one stacked model (the sigma_train members of a seed; "
    "each gets the weights of training it alone): at most this many per job, 1 = one at a time. "
    "Default: on GPUs, one stack per GPU; on a CPU, 1 (no faster there).")]


@contextlib.contextmanager
def user_errors():
    """Turn dni's errors into one clear line and a non-zero exit code."""
    try:
        yield
    except DniError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted; finished work is in the store, rerun to continue")
        raise typer.Exit(130) from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpecError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise SpecError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")
    return device


def _setup(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _reporter():
    from dni.progress import ConsoleReporter

    return ConsoleReporter(sys.stderr)


ArchOpt = Annotated[str, typer.Option(help="Architecture: lstm, rnn or gru.")]
DataOpt = Annotated[str, typer.Option(help="Data set: rows (28x28 images) or strokes (pen strokes).")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Training epochs (default: dni's recipe for the arch and data, see README).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Training mini-batch size.")]
LrOpt = Annotated[Optional[float], typer.Option(help="Adam learning rate (default: 3e-3; 1e-3 for the vanilla RNN).")]
LrDecayOpt = Annotated[Optional[float], typer.Option("--lr-decay", help="Learning-rate factor per epoch (default: 0.95; 0.97 for the vanilla RNN).")]
ClipOpt = Annotated[float, typer.Option("--grad-clip", help="Max gradient norm.")]
ValSizeOpt = Annotated[int, typer.Option("--val-size", help="Training digits held out for model selection.")]
StrokeOpt = Annotated[str, typer.Option("--stroke-repr", help="Strokes input: absolute or offsets.")]
HiddenOpt = Annotated[int, typer.Option("--hidden-size", help="State size H.")]
LimitTrainOpt = Annotated[Optional[int], typer.Option("--limit-train", help="Use only the first N training digits.")]
LimitTestOpt = Annotated[Optional[int], typer.Option("--limit-test", help="Use only the first N test digits.")]
SigmaValOpt = Annotated[str, typer.Option("--sigma-val", help="Inference noise grid: 0,0.5,1 or 0:1:0.1.")]
RepeatsOpt = Annotated[int, typer.Option(help="Independent noisy passes per sigma_val.")]
EvalSeedOpt = Annotated[int, typer.Option("--eval-seed", help="Seed of the inference noise.")]
EvalBatchOpt = Annotated[int, typer.Option("--eval-batch-size", help="Test digits per batch (fixes the noise layout).")]
NoiseSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the inference noise.")]
RngOpt = Annotated[str, typer.Option("--rng", help="Inference noise generator: philox (dni's default stream, fast on CPU), ars (dni's AES-based stream: noisy LSTM passes ~13% faster on x86 CPUs, other samples than philox) or torch.")]
NoiseTrainOpt = Annotated[str, typer.Option("--noise-train", help="Training noise model: additive, multiplicative, mixed:R, relative.")]
NoiseValOpt = Annotated[str, typer.Option("--noise-val", help="Inference noise model: additive, multiplicative, mixed:R, relative.")]
WeightNoiseOpt = Annotated[float, typer.Option("--weight-noise", help="Std of programming noise on the weights, redrawn per repeat.")]
TrainRngOpt = Annotated[str, typer.Option("--train-rng", help="Training-noise generator: torch (default), philox (dni's stream; runs the compiled training kernels on CPU, ~1.4-2x faster per epoch) or ars (dni's AES-based stream, likewise).")]
InitOpt = Annotated[str, typer.Option("--init", help="Weight initialisation: torch (PyTorch's defaults) or keras (Glorot/orthogonal, zero biases).")]
SitesOpt = Annotated[str, typer.Option("--sites", help="Noisy products: all, cell, none, or a list of gate sites (i,f,g,o / h / r,u,nx,nh) and out.")]
WeightModeOpt = Annotated[str, typer.Option("--weight-noise-mode", help="absolute, or relative to each tensor's max |w|.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="Of the matrix-vector products at inference: fp32, or bf16 (operands rounded to bfloat16, fp32 sums; changes the numbers, faster where the CPU has AMX).")]


@app.command("train")
def train_cli(
    arch: ArchOpt = "lstm",
    data: DataOpt = "rows",
    sigma_train: Annotated[float, typer.Option("--sigma-train", help="Std of the training noise (Eq. 2).")] = 0.0,
    noise_train: NoiseTrainOpt = "additive",
    sites: SitesOpt = "all",
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = 128,
    lr: LrOpt = None,
    lr_decay: LrDecayOpt = None,
    grad_clip: ClipOpt = 1.0,
    val_size: ValSizeOpt = 5000,
    stroke_repr: StrokeOpt = "absolute",
    hidden_size: HiddenOpt = 128,
    init: InitOpt = "torch",
    train_rng: TrainRngOpt = "torch",
    seed: Annotated[int, typer.Option(help="Seed of initialisation, shuffling and training noise.")] = 0,
    limit_train: LimitTrainOpt = None,
    store: StoreOpt = Path("store"),
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if the model is already in the store.")] = False,
):
    """Train one noise-injected model and save it in the checkpoint store."""
    from dni.jobs import train_job
    from dni.spec import TrainSpec
    from dni.store import Store

    with user_errors():
        _setup(threads)
        spec = TrainSpec(
            arch=arch, data=data, sigma_train=sigma_train, noise=noise_train, stroke_repr=stroke_repr, hidden_size=hidden_size,
            epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay, grad_clip=grad_clip,
            val_size=val_size, limit_train=limit_train, seed=seed, sites=sites, init=init, rng=train_rng,
        )
        st = Store(store)
        result = train_job(st.root, spec, data_dir, str(resolve_device(device)), force, _reporter())
        if not result.trained:
            out.print(f"{result.model_id} is already trained (clean test accuracy {result.test_accuracy:.4f}); use --force to retrain")
            return
        meta = st.read_meta(result.model_id)
        out.print(
            f"trained {result.model_id}: best epoch {meta['best_epoch']}, val accuracy {meta['val_accuracy']:.4f}, "
            f"clean test accuracy {result.test_accuracy:.4f} ({result.wall_time:.0f}s); saved in {st.model_dir(result.model_id)}"
        )


@app.command("sweep")
def sweep_cli(
    arch: ArchOpt = "lstm",
    data: DataOpt = "rows",
    sigma_train: Annotated[str, typer.Option("--sigma-train", help="Training noise grid: 0,0.5,1 or 0:1:0.1.")] = "0:1:0.1",
    sigma_val: SigmaValOpt = "0:1:0.1",
    repeats: RepeatsOpt = 40,
    seeds: Annotated[int, typer.Option(help="Training seeds per sigma_train (0..N-1).")] = 1,
    noise_train: NoiseTrainOpt = "additive",
    noise_val: NoiseValOpt = "additive",
    weight_noise: WeightNoiseOpt = 0.0,
    weight_noise_mode: WeightModeOpt = "absolute",
    precision: PrecisionOpt = "fp32",
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = 128,
    lr: LrOpt = None,
    lr_decay: LrDecayOpt = None,
    grad_clip: ClipOpt = 1.0,
    val_size: ValSizeOpt = 5000,
    stroke_repr: StrokeOpt = "absolute",
    hidden_size: HiddenOpt = 128,
    init: InitOpt = "torch",
    train_rng: TrainRngOpt = "torch",
    limit_train: LimitTrainOpt = None,
    limit_test: LimitTestOpt = None,
    eval_seed: EvalSeedOpt = 0,
    eval_batch_size: EvalBatchOpt = 1000,
    rng: RngOpt = "philox",
    store: StoreOpt = Path("store"),
    out_csv: Annotated[Optional[Path], typer.Option("--out", help="Also write the tidy results (and -summary.csv) here.")] = None,
    executor: Annotated[str, typer.Option(help="local (process pool) or slurm (submitit).")] = "local",
    jobs: Annotated[Optional[int], typer.Option(min=1, help="Local worker processes (default: one per core, or per GPU).")] = None,
    threads: ThreadsOpt = None,
    stack: StackOpt = None,
    partition: Annotated[Optional[str], typer.Option(help="Slurm partition.")] = None,
    time_min: Annotated[int, typer.Option("--time-min", help="Slurm time limit per job (minutes).")] = 120,
    gpus: Annotated[int, typer.Option(help="Slurm GPUs per job (jobs then run on cuda).")] = 0,
    cpus: Annotated[int, typer.Option(help="Slurm CPUs per job.")] = 1,
    mem_gb: Annotated[float, typer.Option("--mem-gb", help="Slurm memory per job (GB).")] = 4.0,
    slurm_config: Annotated[Optional[Path], typer.Option("--slurm-config", help="JSON file of extra submitit slurm_* parameters.")] = None,
    stage: Annotated[str, typer.Option(help="all, or train (only train the models).")] = "all",
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
):
    """Train every missing model of a grid and evaluate every missing cell (resumable)."""
    from dni.spec import EvalSpec, TrainSpec, parse_grid
    from dni.store import Store
    from dni.sweep import MAX_MODELS, SweepSpec, run_sweep

    with user_errors():
        base = TrainSpec(
            arch=arch, data=data, noise=noise_train, stroke_repr=stroke_repr, hidden_size=hidden_size, epochs=epochs, batch_size=batch_size,
            lr=lr, lr_decay=lr_decay, grad_clip=grad_clip, val_size=val_size, limit_train=limit_train, init=init, rng=train_rng,
        )
        if not 1 <= seeds <= MAX_MODELS:
            raise SpecError(f"--seeds must be between 1 and {MAX_MODELS:,}, got {seeds}")
        ev = EvalSpec(sigma_val=parse_grid(sigma_val, "--sigma-val"), repeats=repeats, limit_test=limit_test,
                      batch_size=eval_batch_size, seed=eval_seed, rng=rng, noise=noise_val,
                      weight_noise=weight_noise, weight_noise_mode=weight_noise_mode, precision=precision)
        sweep = SweepSpec(base, parse_grid(sigma_train, "--sigma-train"), tuple(range(seeds)), ev)
        st = Store(store)
        ex = make_executor(executor, jobs, threads, device, data_dir, partition, time_min, gpus, cpus, mem_gb, slurm_config, stack)
        if stage not in ("all", "train"):
            raise SpecError(f"unknown --stage {stage!r}; choose all or train")
        report = run_sweep(st, sweep, ex, _reporter(), out_csv, evaluate=(stage == "all"))
        if report.already_done:
            out.print(f"sweep {report.sweep_id}: everything is already done (nothing to train or evaluate); results in {st.root / 'sweeps' / report.sweep_id}")
        else:
            out.print(f"sweep {report.sweep_id}: trained {report.trained} model(s), evaluated {report.cells} cell(s) "
                      f"in {report.seconds:.0f}s; results in {st.root / 'sweeps' / report.sweep_id}")


def make_executor(kind, jobs, threads, device, data_dir, partition, time_min, gpus, cpus, mem_gb, slurm_config, stack=None):
    """Build the executor named on the command line."""
    from dni.executors import LocalExecutor, SlurmExecutor, default_jobs

    data_dir = str(data_dir) if data_dir else None
    if kind == "local":
        dev = str(resolve_device(device))
        auto_jobs, auto_threads = default_jobs(dev)
        return LocalExecutor(jobs or auto_jobs, threads or auto_threads, dev, data_dir, stack)
    if kind == "slurm":
        extra = {}
        if slurm_config is not None:
            try:
                extra = json.loads(slurm_config.read_text())
            except (OSError, ValueError) as exc:
                raise SpecError(f"cannot read --slurm-config {slurm_config}: {exc}") from None
            if not isinstance(extra, dict):
                raise SpecError(f"--slurm-config {slurm_config} must hold a JSON object")
        return SlurmExecutor(partition=partition, time_min=time_min, gpus=gpus, cpus=cpus, mem_gb=mem_gb, extra=extra, data_dir=data_dir,
                             stack=stack)
    raise SpecError(f"unknown executor {kind!r}; choose local or slurm")


@app.command("status")
def status_cli(store: StoreOpt = Path("store")):
    """Show what each sweep in the store has trained and evaluated, and what is missing."""
    from dni.store import Store
    from dni.sweep import plan, registered

    with user_errors():
        st = Store(store)
        sweeps = registered(st)
        table = Table(title=f"sweeps in {st.root}")
        for col in ("sweep", "arch", "data", "settings", "σ_train", "seeds", "models trained", "cells evaluated", "missing"):
            table.add_column(col)
        for sw in sweeps:
            p = plan(st, sw)
            missing = "nothing" if p.done else f"{len(p.train)} model(s), {p.cells_missing} cell(s)"
            table.add_row(sw.sweep_id, sw.base.arch, sw.base.data, sw.settings(), f"{len(sw.sigma_train)} values", str(len(sw.seeds)),
                          f"{p.models_total - len(p.train)}/{p.models_total}", f"{p.cells_total - p.cells_missing}/{p.cells_total}", missing)
        out.print(table)
        out.print(f"{len(st.model_ids())} model(s) in the store")


@app.command("evaluate")
def evaluate_cli(
    store: StoreOpt = Path("store"),
    model: Annotated[Optional[list[str]], typer.Option("--model", help="Model id or unique prefix (repeatable; default: all).")] = None,
    sigma_val: SigmaValOpt = "0:1:0.1",
    repeats: RepeatsOpt = 40,
    limit_test: LimitTestOpt = None,
    seed: NoiseSeedOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Test digits per batch (fixes the noise layout).")] = 1000,
    rng: RngOpt = "philox",
    noise_val: NoiseValOpt = "additive",
    weight_noise: WeightNoiseOpt = 0.0,
    weight_noise_mode: WeightModeOpt = "absolute",
    sites: SitesOpt = "all",
    precision: PrecisionOpt = "fp32",
    record_states: Annotated[bool, typer.Option("--record-states", help="Also record per-step histograms of h_t and c_t (repeat 0) in the store.")] = False,
    out_csv: Annotated[Optional[Path], typer.Option("--out", help="Write the tidy results (one row per repeat) here.")] = None,
    summary_csv: Annotated[Optional[Path], typer.Option("--summary", help="Write the summary (mean, std, 95% CI) here; default: <out>-summary.csv.")] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
):
    """Evaluate stored models under inference noise: `repeats` noisy passes per sigma_val."""
    from dni.evaluate import evaluate, summarize
    from dni.spec import EvalSpec, parse_grid
    from dni.store import Store, write_csv

    with user_errors():
        _setup(threads)
        ev = EvalSpec(sigma_val=parse_grid(sigma_val, "--sigma-val"), repeats=repeats, limit_test=limit_test, batch_size=batch_size,
                      seed=seed, rng=rng, noise=noise_val, weight_noise=weight_noise, weight_noise_mode=weight_noise_mode, sites=sites,
                      precision=precision)
        st = Store(store)
        ids = [st.resolve(m) for m in model] if model else st.model_ids()
        if not ids:
            raise DniError(f"no trained models in store {st.root}; run `dni train` first")
        ids = list(dict.fromkeys(ids))
        results = evaluate(st, ids, ev, data_dir, resolve_device(device), _reporter())
        summary = summarize(results)
        if record_states:
            from dni.states import record_states as record

            for mid in ids:
                for sigma in ev.sigma_val:
                    record(st, mid, ev, sigma, data_dir, resolve_device(device))
            out.print(f"recorded state histograms in {st.root / 'models'}/<model>/states/")
        if out_csv is not None:
            write_csv(out_csv, results)
            summary_csv = summary_csv or out_csv.with_name(out_csv.stem + "-summary.csv")
        if summary_csv is not None:
            write_csv(summary_csv, summary)
        _print_summary(summary)
        if out_csv is not None:
            out.print(f"wrote {len(results)} rows to {out_csv} and the summary to {summary_csv}")


def _print_summary(summary) -> None:
    table = Table(title="accuracy under inference noise (mean over repeats, 95% CI)")
    for col in ("model", "σ_train", "σ_val", "n", "mean", "95% CI"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for row in summary.itertuples():
        ci = "-" if np.isnan(row.ci_low) else f"[{row.ci_low:.4f}, {row.ci_high:.4f}]"
        table.add_row(row.model_id, f"{row.sigma_train:g}", f"{row.sigma_val:g}", str(row.n), f"{row.mean:.4f}", ci)
    out.print(table)


@app.command("describe")
def describe_cli(
    arch: ArchOpt = "lstm",
    data: Annotated[str, typer.Option(help="Data set: rows or strokes.")] = "rows",
    hidden_size: Annotated[int, typer.Option("--hidden-size", help="State size H.")] = 128,
):
    """Print an architecture as in the paper's Tables I-III."""
    from dni.data import input_shape
    from dni.models import build_model, count_parameters
    from dni.spec import TrainSpec

    with user_errors():
        spec = TrainSpec(arch=arch, data=data, hidden_size=hidden_size)
        steps, inputs = input_shape(spec.data)
        model = build_model(spec.arch, inputs, spec.hidden_size)
        name = {"lstm": "LSTM", "rnn": "vanilla RNN", "gru": "GRU"}[arch]
        cells = f"{name.split()[-1]} cells"
        table = Table(title=f"A {steps}-step {name} architecture for MNIST ({data})")
        table.add_column("")
        table.add_column("", justify="right")
        table.add_row(f"No. {cells}", str(steps))
        table.add_row("Input shape", f"({inputs},1)")
        if arch == "lstm":
            table.add_row("LSTM internal state size", str(hidden_size))
            table.add_row("LSTM output state size", str(hidden_size))
        elif arch == "gru":
            table.add_row("GRU state size", str(hidden_size))
        else:
            table.add_row("No. neurons in one RNN cell (RNN state size)", str(hidden_size))
        table.add_row("Noisy matrix-vector products per step", f"{model.noisy_products} (+1 output layer)")
        table.add_row("Total No. trainable parameters", str(count_parameters(model)))
        out.print(table)


@app.command("export")
def export_cli(
    model: Annotated[str, typer.Argument(help="Model id or unique prefix.")],
    out_path: Annotated[Path, typer.Option("--out", help="Output .npz file.")] = Path("weights.npz"),
    store: StoreOpt = Path("store"),
):
    """Export a model's weights as plain arrays (.npz; layout in the README)."""
    from dni.store import Store, atomic_write

    with user_errors():
        st = Store(store)
        stored = st.load_model(st.resolve(model))
        m = stored.model
        w = m.weight.detach().cpu().numpy()
        arrays = {
            "weight_x": w[:, : m.input_size],
            "weight_h": w[:, m.input_size :],
            "bias": m.bias.detach().cpu().numpy(),
            "fc_weight": m.fc.weight.detach().cpu().numpy(),
            "fc_bias": m.fc.bias.detach().cpu().numpy(),
            "gate_order": np.array(m.gate_names),
            "spec_json": np.array(json.dumps(stored.spec.to_dict(), sort_keys=True)),
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            atomic_write(out_path, buf.getvalue())
        except OSError as exc:
            raise DniError(f"cannot write {out_path}: {exc.strerror or exc}") from None
        out.print(f"exported {stored.model_id} to {out_path}")


@app.command("list")
def list_cli(store: StoreOpt = Path("store")):
    """List the models in the store with their clean test accuracy."""
    from dni.store import Store

    with user_errors():
        st = Store(store)
        table = Table(title=f"models in {st.root}")
        for col in ("model", "arch", "data", "σ_train", "seed", "epochs", "clean test acc", "train time"):
            table.add_column(col)
        for mid in st.model_ids():
            spec, meta = st.read_spec(mid), st.read_meta(mid)
            table.add_row(mid, spec.arch, spec.data, f"{spec.sigma_train:g}", str(spec.seed), str(spec.epochs),
                          f"{meta.get('test_accuracy_clean', float('nan')):.4f}", f"{meta.get('wall_time_s', 0):.0f}s")
        out.print(table)


@app.command("bench")
def bench_cli(
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Torch threads (default: torch's, i.e. all cores).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller GEMM for the peak measurement.")] = False,
    workers: Annotated[bool, typer.Option("--workers/--no-workers", help="Also compare 2 processes x 1 thread with 1 x 2 (CPU).")] = True,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (cuda when available).")] = "cpu",
):
    """Benchmark noisy inference and training against fused torch and a naive noisy loop."""
    from dni.bench import run, summary_line

    with user_errors():
        result = run(threads, quick, workers, log=out.print, device=resolve_device(device))
        print(summary_line(result))


@app.command("reproduce")
def reproduce_cli(
    preset: Annotated[str, typer.Option(help="smoke (minutes, CI) or paper (the full protocol, hours on a CPU).")] = "smoke",
    store: Annotated[Optional[Path], typer.Option("--store", help="Checkpoint store (default: <results>/store).")] = None,
    results: Annotated[Path, typer.Option("--results", help="Directory for the tables and comparison.md.")] = Path("results"),
    figures_dir: Annotated[Path, typer.Option("--figures", help="Directory for the figures.")] = Path("figures"),
    executor: Annotated[str, typer.Option(help="local or slurm.")] = "local",
    jobs: Annotated[Optional[int], typer.Option(min=1, help="Local worker processes (default: one per core, or per GPU).")] = None,
    threads: ThreadsOpt = None,
    stack: StackOpt = None,
    partition: Annotated[Optional[str], typer.Option(help="Slurm partition.")] = None,
    time_min: Annotated[int, typer.Option("--time-min", help="Slurm time limit per job (minutes).")] = 120,
    gpus: Annotated[int, typer.Option(help="Slurm GPUs per job.")] = 0,
    cpus: Annotated[int, typer.Option(help="Slurm CPUs per job.")] = 1,
    mem_gb: Annotated[float, typer.Option("--mem-gb", help="Slurm memory per job (GB).")] = 4.0,
    slurm_config: Annotated[Optional[Path], typer.Option("--slurm-config", help="JSON file of extra submitit slurm_* parameters.")] = None,
    cases: Annotated[Optional[str], typer.Option("--cases", help="Only these cases, e.g. lstm-rows,rnn-rows (default: all three).")] = None,
    train_rng: TrainRngOpt = "torch",
    rng: RngOpt = "philox",
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
):
    """Reproduce the paper end to end: sweeps, state histograms, weights, Figs. 2-10, comparison."""
    from dni.figdata import CASES
    from dni.paper import PRESETS, reproduce
    from dni.store import Store

    with user_errors():
        if preset not in PRESETS:
            raise SpecError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        p = dataclasses.replace(PRESETS[preset], train_rng=train_rng)
        p = dataclasses.replace(p, eval=dataclasses.replace(p.eval, rng=rng))
        st = Store(store or results / "store")
        ex = make_executor(executor, jobs, threads, device, data_dir, partition, time_min, gpus, cpus, mem_gb, slurm_config, stack)
        out.print(f"preset {p.name}: {p.description}")
        chosen = CASES
        if cases:
            names = {f"{a}-{d}": (a, d) for a, d in CASES}
            unknown = [c for c in cases.split(",") if c not in names]
            if unknown:
                raise SpecError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(names)}")
            chosen = tuple(names[c] for c in cases.split(","))
        res = reproduce(p, st, results, figures_dir, ex, data_dir, str(resolve_device(device)), _reporter(), chosen)
        prov = res["provenance"]
        out.print(f"done in {prov['this_run_seconds']:.0f}s ({prov['all_sittings_seconds']:.0f}s over {prov['sittings']} sitting(s) "
                  f"of this preset): {len(res['figures'])} figure files in {figures_dir}, tables and comparison.md in {results}")


@app.command("plot")
def plot_cli(
    which: Annotated[str, typer.Argument(help="fig2 ... fig10, or all.")],
    results: Annotated[Path, typer.Option("--results", help="Directory with the reproduction's tables.")] = Path("results"),
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for the PNG and PDF files.")] = Path("figures"),
):
    """Draw the paper's figures from the tables of a reproduction (no recomputation)."""
    from dni.paper import FIGURES, draw_figure

    with user_errors():
        if which == "all":
            numbers = sorted(FIGURES)
        elif which.startswith("fig") and which[3:].isdigit():
            numbers = [int(which[3:])]
        else:
            raise SpecError(f"unknown figure {which!r}; use fig2 ... fig10 or all")
        for n in numbers:
            files = draw_figure(n, results, out_dir)
            out.print(f"fig{n}: {', '.join(str(f) for f in files)}")


@app.command("compare")
def compare_cli(
    results: Annotated[Path, typer.Option("--results", help="Directory with the reproduction's tables.")] = Path("results"),
):
    """Write <results>/comparison.md: the paper's numbers beside ours, with confidence intervals."""
    from dni.paper import comparison_markdown

    with user_errors():
        text = comparison_markdown(results)
        (results / "comparison.md").write_text(text)
        out.print(text, markup=False, highlight=False)


def _summary_for(summary_csv: Path | None, store: Path, arch, data):
    import pandas as pd

    from dni.store import Store

    if summary_csv is not None:
        try:
            return pd.read_csv(summary_csv)
        except (OSError, ValueError) as exc:
            raise DniError(f"cannot read {summary_csv}: {exc}") from None
    from dni.sweep import registered

    st = Store(store)
    frames = [pd.read_csv(st.root / "sweeps" / sw.sweep_id / "summary.csv") for sw in registered(st)
              if (st.root / "sweeps" / sw.sweep_id / "summary.csv").is_file()]
    if not frames:
        raise DniError(f"no summaries in {st.root}: pass --summary FILE (from `dni evaluate --out`) or run `dni sweep`")
    return pd.concat(frames, ignore_index=True).drop_duplicates()


@app.command("plot-accuracy")
def plot_accuracy_cli(
    arch: ArchOpt = "lstm",
    data: DataOpt = "rows",
    summary_csv: Annotated[Optional[Path], typer.Option("--summary", help="Summary CSV (default: every sweep summary in the store).")] = None,
    sigma_train: Annotated[Optional[str], typer.Option("--sigma-train", help="Only these sigma_train values (grid).")] = None,
    store: StoreOpt = Path("store"),
    x: Annotated[str, typer.Option("--x", help="x axis: sigma (σ_val) or snr (measured SNR of the pre-activations, dB; needs the models in --store).")] = "sigma",
    out_file: Annotated[Path, typer.Option("--out", help="Output file (.png or .pdf).")] = Path("accuracy.png"),
    data_dir: DataDirOpt = None,
):
    """Accuracy and error rate vs sigma_val (or SNR), one curve per sigma_train, for any results."""
    from dni import figures
    from dni.figdata import accuracy_curves
    from dni.spec import parse_grid

    with user_errors():
        summary = _summary_for(summary_csv, store, arch, data)
        if sigma_train is not None:
            summary = summary[summary["sigma_train"].isin(parse_grid(sigma_train, "--sigma-train"))]
        if x not in ("sigma", "snr"):
            raise SpecError("--x must be sigma or snr")
        powers = None
        if x == "snr":
            from dni.analysis import model_powers
            from dni.store import Store

            sel = summary[(summary["arch"] == arch) & (summary["data"] == data)]
            powers = model_powers(Store(store), sorted(sel["model_id"].unique()), data_dir)
        try:
            curves = accuracy_curves(summary, arch, data, powers)
        except (ValueError, KeyError) as exc:
            raise DniError(str(exc)) from None
        fig = figures.fig_accuracy([(f"{arch}, {data}", curves)], "snr_db" if x == "snr" else "sigma_val")
        _save_single(fig, out_file)


@app.command("plot-histograms")
def plot_histograms_cli(
    arch: ArchOpt = "lstm",
    data: DataOpt = "rows",
    pair: Annotated[Optional[list[str]], typer.Option("--pair", help="sigma_train,sigma_val (repeatable; default 0,0 0,1 1,1).")] = None,
    state: Annotated[str, typer.Option(help="h (output states) or c (cell states).")] = "h",
    store: StoreOpt = Path("store"),
    limit_test: LimitTestOpt = None,
    out_file: Annotated[Path, typer.Option("--out", help="Output file (.png or .pdf).")] = Path("states.png"),
    data_dir: DataDirOpt = None,
):
    """Per-step state distributions of stored models (recorded into the store on first use)."""
    import pandas as pd

    from dni import figures
    from dni.spec import EvalSpec
    from dni.states import record_states
    from dni.store import Store

    with user_errors():
        if state not in ("h", "c"):
            raise SpecError("--state must be h or c")
        pairs = [tuple(float(v) for v in p.split(",")) for p in pair] if pair else [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
        if any(len(p) != 2 for p in pairs):
            raise SpecError("--pair takes sigma_train,sigma_val")
        st = Store(store)
        ev = EvalSpec(limit_test=limit_test)
        frames = []
        for s_train, s_val in pairs:
            matches = [m for m in st.model_ids() if (sp := st.read_spec(m)).arch == arch and sp.data == data and sp.sigma_train == s_train]
            if not matches:
                raise DniError(f"no {arch}/{data} model with sigma_train={s_train:g} in {st.root}")
            frames.append(record_states(st, matches[0], ev, s_val, data_dir))
        fig = figures.fig_states(pd.concat(frames), state, f"{arch} {'output' if state == 'h' else 'cell'} states, {data}", pairs)
        _save_single(fig, out_file)


@app.command("plot-weights")
def plot_weights_cli(
    arch: ArchOpt = "lstm",
    data: DataOpt = "rows",
    sigma_train: Annotated[Optional[str], typer.Option("--sigma-train", help="Only these sigma_train values (grid).")] = None,
    store: StoreOpt = Path("store"),
    out_file: Annotated[Path, typer.Option("--out", help="Output file (.png or .pdf).")] = Path("weights.png"),
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write the weight powers here.")] = None,
):
    """Weight histograms and expected weight power of stored models."""
    from dni import figures
    from dni.figdata import weight_tables
    from dni.spec import parse_grid
    from dni.store import Store, write_csv

    with user_errors():
        st = Store(store)
        wanted = parse_grid(sigma_train, "--sigma-train") if sigma_train else None
        ids = [m for m in st.model_ids() if (sp := st.read_spec(m)).arch == arch and sp.data == data
               and (wanted is None or sp.sigma_train in wanted)]
        if not ids:
            raise DniError(f"no {arch}/{data} models in {st.root}")
        hist, power = weight_tables(st, ids)
        if csv is not None:
            write_csv(csv, power)
        _save_single(figures.fig_weights(hist, power, f"{arch} weights, {data}"), out_file)


@app.command("robustness")
def robustness_cli(
    results_csv: Annotated[list[Path], typer.Option("--results", help="Tidy results CSV(s) (dni evaluate/sweep --out, or results/<arch>-<data>.csv).")],
    out_csv: Annotated[Path, typer.Option("--out", help="Robustness table (CSV).")] = Path("robustness.csv"),
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the table (.png or .pdf).")] = None,
    chance: Annotated[float, typer.Option(help="Chance accuracy (0.1 for ten classes).")] = 0.1,
    n_boot: Annotated[int, typer.Option("--n-boot", min=10, help="Bootstrap resamples of the repeats.")] = 1000,
):
    """Per model: midpoint noise level and area under the accuracy curve, with 95% CIs."""
    import pandas as pd

    from dni.analysis import robustness
    from dni.store import write_csv

    with user_errors():
        try:
            results = pd.concat([pd.read_csv(p) for p in results_csv], ignore_index=True)
        except (OSError, ValueError) as exc:
            raise DniError(f"cannot read results: {exc}") from None
        missing = {"model_id", "sigma_val", "repeat", "accuracy"} - set(results.columns)
        if missing:
            raise DniError(f"results lack column(s) {', '.join(sorted(missing))}")
        table = robustness(results, chance, n_boot)
        write_csv(out_csv, table)
        show = Table(title="robustness (95% bootstrap CI)")
        for col in ("model", "σ_train", "clean", "midpoint σ_val", "AUC"):
            show.add_column(col)
        for r in table.itertuples():
            mid = f"> {r.sigma_max:g}" if np.isnan(r.midpoint_sigma) else f"{r.midpoint_sigma:.3f} [{r.midpoint_ci_low:.3f}, {r.midpoint_ci_high:.3f}]"
            show.add_row(r.model_id, f"{r.sigma_train:g}", f"{r.clean_accuracy:.4f}", mid, f"{r.auc:.4f} [{r.auc_ci_low:.4f}, {r.auc_ci_high:.4f}]")
        out.print(show)
        out.print(f"wrote {out_csv}")
        if plot is not None:
            from dni import figures

            _save_single(figures.fig_robustness(table), plot)


@app.command("vote")
def vote_cli(
    model: Annotated[str, typer.Option("--model", help="Model id or unique prefix.")],
    k: Annotated[str, typer.Option("--k", help="Numbers of noisy inferences per input, e.g. 1,3,5,9.")] = "1,3,5,9",
    method: Annotated[str, typer.Option(help="majority (vote of the argmaxes) or mean (of the logits).")] = "majority",
    sigma_val: SigmaValOpt = "0.5,1",
    repeats: RepeatsOpt = 5,
    limit_test: LimitTestOpt = None,
    seed: NoiseSeedOpt = 0,
    noise_val: NoiseValOpt = "additive",
    rng: RngOpt = "philox",
    store: StoreOpt = Path("store"),
    out_csv: Annotated[Path, typer.Option("--out", help="Tidy CSV: one row per (sigma_val, repeat, K).")] = Path("vote.csv"),
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw accuracy vs K (.png or .pdf).")] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
):
    """Accuracy of classifying by K independent noisy inferences (voting / multi-execution)."""
    from dni.analysis import vote
    from dni.data import load_dataset
    from dni.spec import EvalSpec, parse_grid
    from dni.store import Store, write_csv

    with user_errors():
        try:
            ks = sorted({int(v) for v in k.split(",")})
        except ValueError:
            raise SpecError(f"--k takes a list of integers, got {k!r}") from None
        if not ks or ks[0] < 1 or ks[-1] > 999:
            raise SpecError("--k values must be between 1 and 999")
        ev = EvalSpec(sigma_val=parse_grid(sigma_val, "--sigma-val"), repeats=repeats, limit_test=limit_test, seed=seed, noise=noise_val, rng=rng)
        st = Store(store)
        dev = resolve_device(device)
        stored = st.load_model(st.resolve(model), dev)
        test = load_dataset(stored.spec.data, "test", data_dir, stroke_repr=stored.spec.stroke_repr, limit=limit_test)
        table = vote(stored.model, stored.model_id, test, ev, ks, method, dev)
        table.insert(1, "sigma_train", stored.spec.sigma_train)
        write_csv(out_csv, table)
        g = table.groupby(["sigma_val", "k"])["accuracy"].mean().unstack("k")
        show = Table(title=f"{method} vote of K noisy inferences: mean accuracy over {repeats} repeats")
        show.add_column("σ_val")
        for kk in g.columns:
            show.add_column(f"K={kk}", justify="right")
        for sv, row in g.iterrows():
            show.add_row(f"{sv:g}", *[f"{v:.4f}" for v in row])
        out.print(show)
        out.print(f"wrote {out_csv}")
        if plot is not None:
            from dni import figures

            _save_single(figures.fig_vote(table, f"{stored.model_id[:28]}, {method}"), plot)


@app.command("walk")
def walk_cli(
    model: Annotated[str, typer.Option("--model", help="Model id or unique prefix.")],
    sigma_val: SigmaValOpt = "0.5,1",
    repeats: RepeatsOpt = 10,
    limit_test: LimitTestOpt = None,
    noise_val: NoiseValOpt = "additive",
    seed: NoiseSeedOpt = 0,
    store: StoreOpt = Path("store"),
    out_csv: Annotated[Path, typer.Option("--out", help="Per-site summary (CSV).")] = Path("walk.csv"),
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the accuracy drop per site.")] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
):
    """Layer sensitivity: noise at one matrix-vector product (site) at a time; accuracy drop per site."""
    from dni.analysis import walk
    from dni.spec import EvalSpec, parse_grid
    from dni.store import Store, write_csv

    with user_errors():
        st = Store(store)
        mid = st.resolve(model)
        ev = EvalSpec(sigma_val=parse_grid(sigma_val, "--sigma-val"), repeats=repeats, limit_test=limit_test, seed=seed, noise=noise_val)
        table = walk(st, mid, ev, data_dir, resolve_device(device))
        write_csv(out_csv, table)
        show = Table(title=f"noise at one site at a time: {mid}")
        for col in ("σ_val", "site", "accuracy", "95% CI", "drop (pp)"):
            show.add_column(col)
        for r in table.itertuples():
            ci = "-" if np.isnan(r.ci_low) else f"[{r.ci_low:.4f}, {r.ci_high:.4f}]"
            show.add_row(f"{r.sigma_val:g}", r.sites, f"{r.mean:.4f}", ci, f"{100 * r.drop:+.2f}")
        out.print(show)
        out.print(f"wrote {out_csv}")
        if plot is not None:
            from dni import figures

            _save_single(figures.fig_walk(table, mid[:30]), plot)


def _save_single(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path)
    except (OSError, ValueError) as exc:
        raise DniError(f"cannot write {path}: {exc}") from None
    finally:
        plt.close(fig)
    out.print(f"wrote {path}")


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
