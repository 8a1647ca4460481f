"""Deep Noise Injection training: the network sees noise of strength sigma_train after every
matrix-vector product in every forward pass of training (Section II, Eq. 2).

Recipe (the paper states none; every choice is a :class:`~dni.spec.TrainSpec` field):
Adam with the learning rate, per-epoch decay and epochs of :data:`~dni.spec.RECIPES`,
batch 128, gradient norm clipped at 1 (both in :func:`dni.optim.clip_and_step`),
cross-entropy on the noisy logits. The last 5,000 training digits are held out; the epoch
with the best validation accuracy *under the training noise* is kept, since the model is
meant to run on hardware of that noise level.

The training noise comes from torch's generator (``rng="torch"``, the default) or from
dni's Philox stream (``rng="philox"``). With Philox on CPU the noisy recurrence runs in the
compiled kernels with a hand-written backward (:func:`dni.kernels.fused_layer_train`).
"""

from __future__ import annotations

import math
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import dni
from dni import mkl_path
from dni.cpuinfo import first_processor
from dni.data import Dataset, load_dataset
from dni.errors import DivergenceError, SpecError
from dni.memory import keep_freed_memory
from dni.models import NoisyRecurrent, build_model
from dni.noise import Generator, NoiseModel, make_noise
from dni.noise import make_generator as make_noise_source
from dni.optim import clip_and_step
from dni.progress import Reporter, SilentReporter
from dni.seeding import derive_seed, make_generator
from dni.spec import TrainSpec
from dni.stacking import StackedRecurrent, accuracies, batched, member_losses, order, stack_key, stackable


@dataclass
class TrainResult:
    """A trained model with its training curve and provenance."""

    spec: TrainSpec
    model: NoisyRecurrent
    history: list[dict[str, Any]]
    best_epoch: int
    val_accuracy: float
    test_accuracy: float
    wall_time: float
    meta: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def accuracy(
    model: NoisyRecurrent,
    ds: Dataset,
    noise: NoiseModel,
    generator: Generator,
    batch_size: int = 1000,
    sites: str = "all",
) -> float:
    """Fraction of ``ds`` classified correctly in one (noisy) pass."""
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    for start in range(0, len(ds), batch_size):
        x = ds.x[start : start + batch_size].to(device)
        y = ds.y[start : start + batch_size].to(device)
        correct += int((model(x, noise, generator, sites=sites).argmax(1) == y).sum())
    return correct / max(len(ds), 1)


def split_train_val(ds: Dataset, val_size: int) -> tuple[Dataset, Dataset]:
    """The last ``val_size`` digits are held out for model selection."""
    n = len(ds) - val_size
    return ds.subset(slice(0, n)), ds.subset(slice(n, None))


def provenance(device: torch.device) -> dict[str, Any]:
    """Versions and machine a result was produced with."""
    return {
        "dni_version": dni.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        # MKL's kernels, and with them the products' bits, follow its code path (dni.mkl_path).
        "mkl_path": mkl_path.describe(),
        # torch's own CPU kernels are chosen by instruction set (AVX2, AVX512, ...): training's
        # bits differ between them (tests/test_training_kernels.py pins both).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        # Results are bit-identical only for the same thread count (BLAS reduction order).
        "torch_threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU: vendor, model name and (x86) family/model numbers from /proc/cpuinfo, as in
    'AuthenticAMD AMD EPYC (family 25, model 17)'; else what :mod:`platform` knows. Bits
    can depend on it: the BLAS picks its kernels, and with them the order of its sums, by
    CPU (see the README's determinism notes)."""
    fields = first_processor(cpuinfo)
    name = " ".join(v for v in (fields.get("vendor_id"), fields.get("model name")) if v)
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name or platform.processor() or platform.machine()


def git_commit() -> str | None:
    """Commit of the dni source tree, when it is a git checkout (with '+dirty' if modified)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def train_step(
    net: NoisyRecurrent | StackedRecurrent,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: Generator,
    max_norm: float,
    active: list[int] | None = None,
    together: bool = False,
    noise: NoiseModel | None = None,
    sites: str = "all",
) -> tuple[list[float], list[int]]:
    """One training step: the noisy forward pass, the cross-entropy, backward, gradient
    clipping and the optimizer's update (:func:`dni.optim.clip_and_step`).

    Args:
        net: one model, run under ``noise`` at ``sites``; or a stack, whose ``active``
            members each get their own loss (with the gradient 1), clipping and update,
            and the others none; ``together``: in the stack's batched forms
            (:func:`dni.stacking.batched`).

    Returns:
        ``(losses, correct)``: the loss of the model or of each active member, as a float,
        and how many of ``y`` the noisy logits classify right (a stack: for every member),
        read from the device in one synchronisation. A model or member whose loss is not
        finite takes no step; the others take theirs.
    """
    if isinstance(net, StackedRecurrent):
        logits = net(x, generator)
        losses = member_losses(logits, y, active, together)
    else:
        logits = net(x, noise, generator, sites=sites)
        loss = F.cross_entropy(logits, y)
        losses, logits = loss.view(1), logits.unsqueeze(0)
    right = (logits.detach().argmax(2) == y).sum(1)
    numbers = torch.cat((losses.detach().float(), right.float())).tolist()  # the one synchronisation
    values, correct = numbers[: len(losses)], [int(n) for n in numbers[len(losses) :]]
    kept = [j for j, value in enumerate(values) if math.isfinite(value)]
    if not kept:
        return values, correct
    for group in opt.param_groups:  # opt.zero_grad(set_to_none=True), without its profiling wrapper
        for p in group["params"]:
            p.grad = None
    if not isinstance(net, StackedRecurrent):
        loss.backward()
        clip_and_step(opt, max_norm)
    else:
        (losses if len(kept) == len(losses) else losses[kept]).sum().backward()
        clip_and_step(opt, max_norm, [active[j] for j in kept], together)
    return values, correct


def train(
    spec: TrainSpec,
    data_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    reporter: Reporter | None = None,
) -> TrainResult:
    """Train one model as specified and return it (the caller decides where to store it).

    Raises:
        DivergenceError: the loss or the weights became non-finite.
    """
    (result,) = train_stack([spec], data_dir, device, reporter)
    if isinstance(result, DivergenceError):
        raise result
    return result


def train_stack(
    specs: list[TrainSpec],
    data_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    reporter: Reporter | None = None,
) -> list[TrainResult | DivergenceError]:
    """Train one model, or the members of one stack (specs that differ only in
    sigma_train, see :mod:`dni.stacking`) together, each as :func:`train` would alone.

    Returns:
        One entry per spec, in the order of ``specs``: its result, or the
        :class:`DivergenceError` that stopped it (the other members train on).
    """
    reporter = reporter or SilentReporter()
    device = torch.device(device)
    keep_freed_memory()  # each step's buffers reuse the last step's pages
    t0 = time.perf_counter()
    spec = specs[0]
    if len(specs) > 1 and (any(stack_key(s) != stack_key(spec) for s in specs) or not stackable(spec, device)):
        raise SpecError("only models that differ in sigma_train alone, of a kind dni.stacking trains, form a stack")
    members = order(specs)
    full = load_dataset(spec.data, "train", data_dir, stroke_repr=spec.stroke_repr, limit=spec.limit_train)
    train_ds, val_ds = split_train_val(full, spec.val_size)
    test_ds = load_dataset(spec.data, "test", data_dir, stroke_repr=spec.stroke_repr)
    x_all, y_all = train_ds.x.to(device), train_ds.y.to(device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec.seed, "init"))
        # Initialised once: the first draws of the init seed (as every model since the start).
        model = build_model(spec.arch, full.inputs, spec.hidden_size, init=spec.init).to(device)
    model.parse_sites(spec.sites)  # fail early on an unknown site
    noises = [make_noise(s.noise, s.sigma_train) for s in members]
    clean = make_noise(spec.noise, 0.0)
    noise_gen = make_noise_source(spec.rng, derive_seed(spec.seed, "train-noise"), device)  # one stream: shared by a stack
    shuffle_gen = make_generator(derive_seed(spec.seed, "shuffle"), "cpu")
    stack = StackedRecurrent([model] * len(members), [s.sigma_train for s in members]).to(device) if len(members) > 1 else None
    opt = torch.optim.Adam((stack or model).parameters(), lr=spec.lr)
    batches = math.ceil(len(train_ds) / spec.batch_size)

    together = stack is not None and batched(device)  # the stack's batched forms (dni.stacking.batched)
    val_xy = (val_ds.x.to(device), val_ds.y.to(device)) if together else None
    alive = list(range(len(members)))
    errors: dict[int, DivergenceError] = {}
    history: list[list[dict[str, Any]]] = [[] for _ in members]
    best: list[tuple[dict | None, float, int]] = [(None, -1.0, 0) for _ in members]  # (state, val acc, epoch)
    names = spec.model_id if stack is None else f"{len(members)} models of {spec.arch}-{spec.data} seed {spec.seed} (stacked)"
    reporter.log(f"training {names} on {len(train_ds)} digits ({len(val_ds)} held out), {spec.epochs} epochs, {device}")

    def diverged(k: int, message: str) -> None:
        errors[k] = DivergenceError(message)
        alive.remove(k)

    def check(k: int) -> tuple[NoisyRecurrent, float, float]:
        """Member k (a copy, for a stack), its validation accuracy under its training noise
        and without noise."""
        member = model if stack is None else stack.member(k)
        if not len(val_ds):
            return member, float("nan"), float("nan")
        # A fixed generator per evaluation makes epochs comparable (same noise draws).
        val_gen = make_noise_source(spec.rng, derive_seed(spec.seed, "val-noise"), device)
        return member, accuracy(member, val_ds, noises[k], val_gen, sites=spec.sites), accuracy(member, val_ds, clean, None)

    with reporter.task("train", spec.epochs * batches) as task:
        for epoch in range(1, spec.epochs + 1):
            lr = spec.lr * spec.lr_decay ** (epoch - 1)
            for group in opt.param_groups:
                group["lr"] = lr
            (stack or model).train()
            started = time.perf_counter()
            loss_sum, correct = [0.0] * len(members), [0] * len(members)
            perm = torch.randperm(len(train_ds), generator=shuffle_gen).to(device)
            for b, idx in enumerate(perm.split(spec.batch_size), start=1):
                x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)  # as x_all[idx], at half the cost
                active = list(alive)
                values, right = train_step(stack or model, opt, x, y, noise_gen, spec.grad_clip, active, together,
                                           noises[0], spec.sites)
                for k, value in zip(active, values):
                    if not math.isfinite(value):
                        diverged(k, f"training diverged in epoch {epoch}, batch {b}: loss is {value} "
                                    f"(sigma_train={members[k].sigma_train}); try a lower --lr or --grad-clip")
                    else:
                        loss_sum[k] += value * len(y)
                        correct[k] += right[k]
                if not alive:
                    break
                task.advance(1, epoch=epoch, loss=values[0])
            for k in list(alive):
                if not (all(torch.isfinite(p).all() for p in model.parameters()) if stack is None else stack.member_finite(k)):
                    diverged(k, f"training diverged in epoch {epoch}: weights became non-finite")
            if not alive:
                break
            if together and len(val_ds):  # every member in one pass per batch, as in the steps
                val_gen = make_noise_source(spec.rng, derive_seed(spec.seed, "val-noise"), device)
                noisy_acc, clean_acc = accuracies(stack, *val_xy, val_gen), accuracies(stack, *val_xy, None)
                checked = {k: (stack.member(k), noisy_acc[k], clean_acc[k]) for k in alive}
            else:
                checked = {k: check(k) for k in alive}
            seconds = time.perf_counter() - started
            for k, (member, val_acc, clean_acc) in checked.items():
                row = {
                    "epoch": epoch,
                    "lr": lr,
                    "train_loss": loss_sum[k] / len(train_ds),
                    "train_accuracy": correct[k] / len(train_ds),
                    "val_accuracy": val_acc,
                    "val_accuracy_clean": clean_acc,
                    "seconds": seconds,  # the whole stack's epoch, for a stack
                }
                history[k].append(row)
                reporter.log(
                    f"{'' if stack is None else f'sigma_train {members[k].sigma_train:g}: '}epoch {epoch}/{spec.epochs}: "
                    f"loss {row['train_loss']:.4f} train acc {row['train_accuracy']:.4f} "
                    f"val acc {val_acc:.4f} (clean {clean_acc:.4f}) {seconds:.1f}s"
                )
                if not len(val_ds) or val_acc > best[k][1]:
                    best[k] = ({n: v.detach().clone() for n, v in member.state_dict().items()}, val_acc, epoch)
    chosen = {}
    for k in alive:
        member = model if stack is None else stack.member(k)
        member.load_state_dict(best[k][0])
        chosen[k] = member.eval()
    if together and chosen:  # the chosen members' test pass as one stack
        tests = accuracies(StackedRecurrent(list(chosen.values()), [members[k].sigma_train for k in chosen]).to(device),
                           test_ds.x.to(device), test_ds.y.to(device), None)
        trained = {k: (member, acc) for (k, member), acc in zip(chosen.items(), tests)}
    else:
        trained = {k: (member, accuracy(member, test_ds, clean, None)) for k, member in chosen.items()}
    wall = time.perf_counter() - t0
    own = wall / len(members)  # a stack member's share of the stack's time
    results: dict[int, TrainResult | DivergenceError] = dict(errors)
    for k, (member, test_acc) in trained.items():
        _, best_acc, best_epoch = best[k]
        meta = {
            **provenance(device),
            "history": history[k],
            "best_epoch": best_epoch,
            "val_accuracy": best_acc,
            "test_accuracy_clean": test_acc,
            "n_train": len(train_ds),
            "n_val": len(val_ds),
            "wall_time_s": own,
        }
        if stack is not None:
            meta["stack"] = {"members": [s.model_id for s in members], "wall_time_s": wall}
        results[k] = TrainResult(members[k], member, history[k], best_epoch, best_acc, test_acc, own, meta)
    by_spec = {id(s): results[k] for k, s in enumerate(members)}
    return [by_spec[id(s)] for s in specs]
