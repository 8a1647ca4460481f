"""Experiment specifications: every default of a training or evaluation run lives here.

A spec is a frozen dataclass. Its canonical JSON form is stored next to every checkpoint
and result, and the model id is derived from it, so the same spec always names the same
model. Change a spec with :func:`dataclasses.replace`, never by mutation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from dni.data import DATASETS, STROKE_REPRS
from dni.errors import SpecError
from dni.models import ARCHS, INITS
from dni.noise import RNGS, WEIGHT_NOISE_MODES, check_noise_kind, check_sigma
from dni.precision import check_precision

SPEC_VERSION = 1
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


def canonical_float(value: float) -> float:
    """Round to 10 decimals so that 0.1 + 0.2 and 0.3 name the same grid point.

    Values too large for 10 decimals within a float's precision are returned as they are.
    """
    value = float(value)
    if not math.isfinite(value) or abs(value) >= 1e12:
        return value
    return float(round(Decimal(repr(value)), 10))


# The (sigma_val, repeat) cells of one model or sweep are planned in memory, a few hundred
# bytes each: larger grids are refused before anything runs, rather than left to exhaust
# the memory (split them). The paper's grid is 11 x 40 cells per model, 4,840 per sweep.
MAX_CELLS = 1_000_000


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_positive(name: str, value: Any) -> None:
    if check_sigma(value, name) <= 0:
        raise SpecError(f"{name} must be > 0, got {value!r}")


#: dni's recipe per (arch, data) for the fields left at None: epochs (enough for the clean
#: accuracy to level off), Adam's learning rate and its decay per epoch. The vanilla RNN
#: needs a gentler, longer schedule to reach the paper's 98% (README, "Training recipe").
RECIPES = {
    ("lstm", "rows"): {"epochs": 20, "lr": 3e-3, "lr_decay": 0.95},
    ("lstm", "strokes"): {"epochs": 30, "lr": 3e-3, "lr_decay": 0.95},
    ("rnn", "rows"): {"epochs": 60, "lr": 1e-3, "lr_decay": 0.97},
    ("rnn", "strokes"): {"epochs": 60, "lr": 1e-3, "lr_decay": 0.97},
    ("gru", "rows"): {"epochs": 20, "lr": 3e-3, "lr_decay": 0.95},
    ("gru", "strokes"): {"epochs": 30, "lr": 3e-3, "lr_decay": 0.95},
}


@dataclass(frozen=True)
class TrainSpec:
    """Everything that determines a trained model (and hence its id).

    The paper does not state its optimiser or schedule; these defaults are dni's recipe
    (see README, "Training recipe").
    """

    arch: str = "lstm"
    data: str = "rows"
    sigma_train: float = 0.0
    noise: str = "additive"
    hidden_size: int = 128
    stroke_repr: str = "absolute"
    epochs: int | None = None  # None: RECIPES of (arch, data), as are lr and lr_decay
    batch_size: int = 128
    lr: float | None = None  # Adam's initial learning rate
    lr_decay: float | None = None  # multiplicative learning-rate decay per epoch
    grad_clip: float = 1.0  # max global gradient norm
    val_size: int = 5000  # held out from the 60,000 training digits for model selection
    limit_train: int | None = None  # use only the first N training digits (smoke runs)
    seed: int = 0
    sites: str = "all"  # which matrix-vector products are noisy (see NoisyRecurrent.parse_sites)
    init: str = "torch"  # weight initialisation, one of models.INITS
    # Training-noise generator: torch (torch.randn), philox (dni's counter-based stream,
    # which lets training run the compiled noisy-recurrence kernels on CPU; ~1.4-2x faster per
    # epoch) or ars (dni's AES-based stream, likewise; see dni.noise.ArsGenerator).
    rng: str = "torch"

    def __post_init__(self) -> None:
        _check_choice("architecture", self.arch, ARCHS)
        _check_choice("data set", self.data, DATASETS)
        check_noise_kind(self.noise)
        _check_choice("stroke representation", self.stroke_repr, STROKE_REPRS)
        _check_choice("initialisation", self.init, INITS)
        _check_choice("training-noise generator", self.rng, RNGS)
        object.__setattr__(self, "sigma_train", canonical_float(check_sigma(self.sigma_train, "sigma_train")))
        for name, value in RECIPES[(self.arch, self.data)].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name, minimum in (("hidden_size", 1), ("epochs", 1), ("batch_size", 1), ("val_size", 0), ("seed", 0)):
            _check_int(name, getattr(self, name), minimum)
        if self.limit_train is not None:
            _check_int("limit_train", self.limit_train, 2)
            if self.val_size >= self.limit_train:
                raise SpecError(f"val_size ({self.val_size}) must be smaller than limit_train ({self.limit_train})")
        _check_positive("lr", self.lr)
        _check_positive("grad_clip", self.grad_clip)
        if not 0 < float(self.lr_decay) <= 1:
            raise SpecError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if self.data == "rows" and self.stroke_repr != "absolute":
            object.__setattr__(self, "stroke_repr", "absolute")  # meaningless for images: keep ids unique

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SpecError(f"unknown TrainSpec field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    @property
    def model_id(self) -> str:
        """Readable, unique id derived from the full spec.

        Fields added after version 1 are left out of the hash while they hold their
        default, so existing stores keep their ids.
        """
        fields = self.to_dict()
        for name, default in LATER_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        digest = hashlib.sha256(canonical_json({"v": SPEC_VERSION, **fields}).encode()).hexdigest()[:10]
        sigma = f"{self.sigma_train:g}".replace("+", "")  # 1e+18 -> 1e18: ids keep [a-z0-9._-]
        return f"{self.arch}-{self.data}-st{sigma}-s{self.seed}-{digest}"


LATER_FIELDS = {"sites": "all", "init": "torch", "rng": "torch"}
#: EvalSpec fields added after version 1, left out of sweep ids while at these defaults.
LATER_EVAL_FIELDS = {"sites": "all", "weight_noise": 0.0, "weight_noise_mode": "absolute", "precision": "fp32"}


@dataclass(frozen=True)
class EvalSpec:
    """How a model is evaluated under inference noise (one cell per (sigma_val, repeat))."""

    sigma_val: tuple[float, ...] = tuple(i / 10 for i in range(11))
    repeats: int = 40
    noise: str = "additive"
    limit_test: int | None = None  # first N test digits; None = all 10,000
    batch_size: int = 1000  # part of the spec: it fixes how noise draws map to samples
    seed: int = 0
    rng: str = "philox"  # noise generator: philox (dni's counter-based stream), ars (dni's AES-based one) or torch
    weight_noise: float = 0.0  # programming noise on the weights, redrawn per repeat
    weight_noise_mode: str = "absolute"  # absolute std, or relative to each tensor's max |w|
    sites: str = "all"  # which matrix-vector products are noisy at inference
    precision: str = "fp32"  # of the matrix-vector products: fp32, or bf16 (changes the numbers; dni.precision)

    def __post_init__(self) -> None:
        grid = tuple(canonical_float(check_sigma(s, "sigma_val")) for s in self.sigma_val)
        if not grid:
            raise SpecError("sigma_val grid is empty")
        object.__setattr__(self, "sigma_val", tuple(dict.fromkeys(grid)))
        _check_int("repeats", self.repeats, 1)
        if len(self.sigma_val) * self.repeats > MAX_CELLS:
            raise SpecError(f"{len(self.sigma_val)} sigma_val values x {self.repeats:,} repeats is more than the "
                            f"{MAX_CELLS:,} cells dni plans at once; split the grid")
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)
        check_noise_kind(self.noise)
        _check_choice("generator", self.rng, RNGS)
        object.__setattr__(self, "weight_noise", check_sigma(self.weight_noise, "weight_noise"))
        _check_choice("weight-noise mode", self.weight_noise_mode, WEIGHT_NOISE_MODES)
        check_precision(self.precision)
        if self.limit_test is not None:
            _check_int("limit_test", self.limit_test, 1)

    def for_sigmas(self, sigma_val: tuple[float, ...]) -> EvalSpec:
        """The same protocol restricted to other sigma_val values."""
        return dataclasses.replace(self, sigma_val=tuple(sigma_val))

    @property
    def protocol(self) -> dict[str, Any]:
        """The fields that fix the numbers of one cell (not which cells are wanted)."""
        protocol = {"noise": self.noise, "limit_test": self.limit_test, "batch_size": self.batch_size, "seed": self.seed, "rng": self.rng}
        if self.weight_noise:  # added later: left out when unused, so existing ids stay valid
            protocol.update(weight_noise=self.weight_noise, weight_noise_mode=self.weight_noise_mode)
        if self.sites != "all":
            protocol["sites"] = self.sites
        if self.precision != "fp32":
            protocol["precision"] = self.precision
        return protocol

    @property
    def protocol_id(self) -> str:
        return hashlib.sha256(canonical_json(self.protocol).encode()).hexdigest()[:10]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def check_id(model_id: str) -> str:
    """Reject ids that could escape the store directory or are not dni ids."""
    if not isinstance(model_id, str) or not _ID_RE.match(model_id):
        raise SpecError(f"invalid model id {model_id!r}")
    return model_id


def parse_grid(text: str, name: str = "grid") -> tuple[float, ...]:
    """Parse ``0,0.5,1`` or an inclusive range ``start:stop:step`` (no float drift).

    Items may be mixed: ``0:0.5:0.1,0.8,1``.
    """
    values: list[Decimal] = []
    try:
        for item in str(text).split(","):
            item = item.strip()
            if not item:
                raise SpecError(f"{name}: empty item in {text!r}")
            if ":" in item:
                parts = [Decimal(p) for p in item.split(":")]
                if len(parts) != 3:
                    raise SpecError(f"{name}: a range is start:stop:step, got {item!r}")
                start, stop, step = parts
                if not all(p.is_finite() for p in parts) or step <= 0 or stop < start:
                    raise SpecError(f"{name}: need finite start <= stop and step > 0 in {item!r}")
                count = int((stop - start) / step + Decimal("1e-9")) + 1
                if count > 10_000:
                    raise SpecError(f"{name}: range {item!r} has more than 10,000 points")
                values.extend(start + k * step for k in range(count))
            else:
                values.append(Decimal(item))
    except InvalidOperation:
        raise SpecError(f"{name}: not a number list or start:stop:step range: {text!r}") from None
    out = []
    for v in values:
        if not v.is_finite():
            raise SpecError(f"{name}: values must be finite, got {text!r}")
        out.append(canonical_float(float(v)))
    return tuple(dict.fromkeys(out))
