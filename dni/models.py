"""Noisy recurrent classifiers: the paper's vanilla RNN and LSTM (Tables I-III).

Each cell keeps one weight matrix ``W = [W_x | W_h]`` of shape (gates·H, I + H) and one
bias per gate, so a gate's pre-activation is ``W·[x_t, h_{t-1}] + b`` — one matrix-vector
product, one bias and, under Deep Noise Injection, one noise draw per element (Eq. 2).
The classifier reads the last output state through a fully connected layer whose logits
are noisy too. The LSTM cell-state update is element-wise and gets no noise.

The input half of the product does not depend on the noise or on the recurrence, so it is
computed for all time steps at once (:meth:`NoisyRecurrent.project`) and can be reused
across many noisy passes (:meth:`NoisyRecurrent.recur`).

Gate order of the LSTM weight rows is (input, forget, cell candidate, output), as in
``torch.nn.LSTM``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from dni import gpu_cells
from dni.errors import SpecError
from dni.noise import NoiseModel, draw_ahead
from dni.precision import operand

#: Called after every time step with (t, h_t, c_t or None); used to record state statistics.
StepObserver = Callable[[int, torch.Tensor, torch.Tensor | None], None]

ARCHS = ("lstm", "rnn", "gru")
HIDDEN_SIZE = 128
#: Weight initialisation schemes (see :meth:`NoisyRecurrent.reset_parameters`).
INITS = ("torch", "keras")
NUM_CLASSES = 10


class NoisyRecurrent(nn.Module):
    """A single-layer recurrent classifier with noise after every matrix-vector product.

    Args:
        input_size: inputs per time step (28 for image rows, 2 for pen strokes).
        hidden_size: state size H (128 in the paper).
        num_classes: outputs of the final fully connected layer.
        init: initialisation scheme, one of :data:`INITS` (drawn once, from torch's global
            generator: seed it to make the weights reproducible).
    """

    gates: ClassVar[int]
    arch: ClassVar[str]
    gate_names: ClassVar[tuple[str, ...]]
    noisy_products: ClassVar[int]  # noisy matrix-vector products per step (plus the output layer)
    #: Precision of the matrix-vector products at inference (see dni.precision); every
    #: product goes through :meth:`_op` on both operands. Not part of the saved state.
    precision: str = "fp32"

    def __init__(self, input_size: int, hidden_size: int = HIDDEN_SIZE, num_classes: int = NUM_CLASSES, init: str = "torch"):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(self.gates * hidden_size, input_size + hidden_size))
        self.bias = nn.Parameter(torch.empty(self.gates * hidden_size))
        self.fc = nn.Linear(hidden_size, num_classes)
        self.reset_parameters(init)

    def reset_parameters(self, scheme: str = "torch") -> None:
        """Initialise every parameter with one of :data:`INITS`.

        ``torch``: PyTorch's recurrent initialisation, U(-1/sqrt(H), 1/sqrt(H)) for W and b,
        and ``nn.Linear``'s for the output layer.

        ``keras``: the defaults of Keras' recurrent layers, the framework whose parameter
        counts match Tables I-III (one bias per gate): Glorot-uniform input weights W_x,
        orthogonal recurrent weights W_h (orthonormal rows of the (H, gates·H) matrix),
        zero biases except a forget-gate bias of 1 for the LSTM, and a Glorot-uniform
        output layer with zero bias.
        """
        if scheme == "torch":
            bound = 1.0 / math.sqrt(self.hidden_size)
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)
            self.fc.reset_parameters()
        elif scheme == "keras":
            rows, n_in, h = self.weight.shape[0], self.input_size, self.hidden_size
            with torch.no_grad():
                w_x = torch.empty(rows, n_in)
                nn.init.xavier_uniform_(w_x)  # fan_in = n_in, fan_out = gates·H, as Keras' kernel
                w_h = torch.empty(rows, h)
                nn.init.orthogonal_(w_h)  # orthonormal columns here = orthonormal rows of Keras' (H, gates·H)
                self.weight.copy_(torch.cat([w_x, w_h], dim=1))
                self.bias.zero_()
                if "f" in self.gate_names:
                    k = self.gate_names.index("f")
                    self.bias[k * h:(k + 1) * h] = 1.0
                nn.init.xavier_uniform_(self.fc.weight)
                nn.init.zeros_(self.fc.bias)
        else:
            raise SpecError(f"unknown initialisation {scheme!r}; choose one of {', '.join(INITS)}")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[2] != self.input_size:
            raise SpecError(
                f"expected input of shape (batch, steps, {self.input_size}), got {tuple(x.shape)}"
            )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Noise-independent part of every pre-activation: ``W_x·x_t + b`` for all t.

        Args:
            x: inputs, shape (batch, steps, input_size).

        Returns:
            Tensor of shape (steps, batch, gates·H).
        """
        self._check_input(x)
        batch, steps, _ = x.shape
        w_x = self._op(self.weight[:, : self.input_size])
        xt = self._op(x.transpose(0, 1).reshape(steps * batch, self.input_size))
        return torch.addmm(self.bias, xt, w_x.t()).view(steps, batch, -1)

    def _op(self, t: torch.Tensor) -> torch.Tensor:
        """An operand of a matrix-vector product, at this model's :attr:`precision`."""
        return operand(t, self.precision)

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer's product (noise-free logits)."""
        if self.precision == "fp32":
            return self.fc(h)
        return torch.nn.functional.linear(self._op(h), self._op(self.fc.weight), self.fc.bias)

    def inline_projection(self, x: torch.Tensor, xp: torch.Tensor):
        """For many noisy passes over one batch (evaluation's cells): what lets the compiled
        LSTM loop compute ``W_x·x_t + b`` itself where the layer has two inputs (strokes),
        instead of streaming ``xp = project(x)`` from memory at every pass; None where it
        does not apply. It is used only if it reproduces ``xp`` bit for bit (checked here)."""
        if self.arch != "lstm" or self.input_size != 2 or type(self).step is not NoisyLSTM.step:
            return None
        if x.device.type != "cpu" or x.dtype != torch.float32 or xp.dtype != torch.float32:
            return None
        from dni import kernels

        lib = kernels.library()
        return None if lib is None else kernels.inline_projection(lib, self._op(x), self._op(self.weight[:, :2]), self.bias, xp)

    def site_names(self) -> tuple[str, ...]:
        """The noise sites of this architecture: its gate products and ``out``."""
        return (*self.gate_names, "out")

    def parse_sites(self, sites: str | None) -> frozenset[str] | None:
        """``all`` / None -> None (every product noisy); else a set of site names.
        ``cell`` stands for every product inside the recurrent cell."""
        if sites is None or sites == "all":
            return None
        names = set()
        for item in str(sites).split(","):
            item = item.strip()
            if item == "cell":
                names.update(self.site_names()[:-1])
            elif item in self.site_names() or item == "none":
                names.add(item)
            else:
                raise SpecError(f"unknown noise site {item!r} for {self.arch}; choose from all, cell, none, {', '.join(self.site_names())}")
        names.discard("none")
        return frozenset(names)

    def _noisy(self, pre: torch.Tensor, noise: NoiseModel, generator, sites: frozenset[str] | None, names: tuple[str, ...]) -> torch.Tensor:
        """Apply ``noise`` to the blocks of ``pre`` (one per name in ``names``) that are sites."""
        if sites is None:
            return noise(pre, generator)
        chosen = [n in sites for n in names]
        if not any(chosen):
            return pre
        if all(chosen):
            return noise(pre, generator)
        width = pre.shape[1] // len(names)
        mask = torch.tensor(chosen, device=pre.device).repeat_interleave(width)
        return torch.where(mask, noise(pre.clone(), generator), pre)

    def recur(
        self,
        xp: torch.Tensor,
        noise: NoiseModel,
        generator: torch.Generator | None = None,
        observer: StepObserver | None = None,
        sites: str | None = None,
        inline=None,
    ) -> torch.Tensor:
        """Run the noisy recurrence over projected inputs and return noisy logits.

        Args:
            xp: output of :meth:`project`, shape (steps, batch, gates·H). Not modified.
                None with ``inline`` where the compiled loop applies: it then never reads
                the projections.
            noise: noise model applied after each matrix-vector product.
            generator: source of the noise draws (``None``: torch's global generator).
            observer: optional callback receiving each step's states.
            sites: which products are noisy: ``all`` (default), or a comma list of
                :meth:`site_names` (``cell`` = every product in the cell, ``none``).
            inline: from :meth:`inline_projection` for these ``xp``: the compiled loop
                then computes the projections instead of reading them (same bits).
        """
        chosen = self.parse_sites(sites)
        if chosen is not None:
            return self._recur_sites(xp, noise, generator, observer, chosen)
        if xp is None and inline is None:
            raise ValueError("recur without xp needs the compiled loop and an inline projection")
        w_h = self._op(self.weight[:, self.input_size :])
        ref = xp if xp is not None else inline.x  # (steps, batch, ...)
        steps, batch = ref.shape[:2]
        # The compiled path here is for inference; training runs it from forward() with the
        # input projection folded in (fused_layer_train).
        needs_grad = torch.is_grad_enabled() and (ref.requires_grad or w_h.requires_grad)
        fused = None if observer is not None or needs_grad else _fused_kernel(self, noise, generator, ref)
        if xp is None and fused is None:
            raise ValueError("recur without xp needs the compiled loop (CPU, fp32 or bf16, a dni stream or no noise)")
        if fused is not None:
            from dni.kernels import fused_recurrence, torch_single_threaded

            lib, sigma = fused
            starts = _stream_starts(generator, batch * w_h.shape[0], steps, sigma)
            threads = torch.get_num_threads()
            # The whole pass runs with torch single-threaded and dni's own threads doing the
            # recurrence: any multi-threaded torch op here (even zero-filling h) would wake
            # torch's OpenMP team, which then spins on the core that dni's other thread uses.
            with torch_single_threaded():
                h = ref.new_zeros(batch, self.hidden_size)
                c = ref.new_zeros(batch, self.hidden_size) if self.arch == "lstm" else None
                w_h16 = w_h.to(torch.bfloat16) if self.precision == "bf16" else None
                fused_recurrence(lib, self.arch, xp, w_h, h, c, _stream_key(generator), starts, sigma, threads=threads, inline=inline,
                                 w_h16=w_h16, stream=_stream_id(generator))
                return noise(self._out(h), generator)
        # One draw per pre-activation element and per logit.
        draw_ahead(generator, noise, steps * batch * w_h.shape[0] + batch * self.fc.out_features, xp.device)
        h = xp.new_zeros(batch, self.hidden_size)
        c = xp.new_zeros(batch, self.hidden_size) if self.arch == "lstm" else None
        for t, xp_t in enumerate(xp.unbind(0)):
            # Eq. (2): g(W·[x_t, h_{t-1}] + b + z), one draw per pre-activation element.
            pre = noise(torch.addmm(xp_t, self._op(h), w_h.t()), generator)
            h, c = self.step(pre, c)
            if observer is not None:
                observer(t, h, c)
        return noise(self._out(h), generator)

    #: Samples drawn ahead at once for the passes of :meth:`recur_repeats` (1 GiB of float32).
    REPEATS_SAMPLES = 1 << 28

    def recurs_repeats(self, xp: torch.Tensor, noise: NoiseModel, generators) -> bool:
        """Whether :meth:`recur_repeats` runs these passes: on a device where passes draw
        their noise ahead (a GPU, see :meth:`CounterGenerator.draws_ahead_on`), for the
        LSTM and RNN at fp32 with additive noise from dni's streams at one position."""
        from dni.noise import AdditiveGaussian, CounterGenerator

        if not plain_cell(self) or self.precision != "fp32" or xp.dtype != torch.float32:
            return False
        if not isinstance(noise, AdditiveGaussian) or noise.is_noiseless:
            return False
        if not all(isinstance(g, CounterGenerator) for g in generators) or len({g.counter for g in generators}) != 1:
            return False
        return all(g.draws_ahead_on(xp.device) for g in generators)

    def recur_repeats(self, xp: torch.Tensor, noise: NoiseModel, generators) -> torch.Tensor:
        """Noisy logits of one pass per generator over the same projected inputs, shape
        (passes, batch, classes): pass r is :meth:`recur` ``(xp, noise, generators[r])``,
        with the same samples (each stream advances as that pass would advance it), run as
        one batched pass. On a GPU each pass's ~300 small kernels cost more to launch than
        to run; batched, the passes share the launches. Only where :meth:`recurs_repeats`."""
        from dni.noise import stream_draws

        steps, batch, rows = xp.shape
        passes, classes = len(generators), self.fc.out_features
        z, offsets = stream_draws(generators, [batch * rows] * steps + [batch * classes], xp.device)

        def samples(k: int, shape) -> torch.Tensor:  # every pass's samples of draw k
            return z[:, offsets[k] : offsets[k] + shape[0] * shape[1]].view(passes, *shape)

        w_h = self.weight[:, self.input_size :].t().expand(passes, self.hidden_size, rows)
        h = xp.new_zeros(passes, batch, self.hidden_size)
        c = xp.new_zeros(passes, batch, self.hidden_size) if self.arch == "lstm" else None
        for t, xp_t in enumerate(xp.unbind(0)):
            # Eq. (2) for every pass: the product of recur(), then its own samples
            h, c = self.step(noise.add_samples_(torch.baddbmm(xp_t, h, w_h), samples(t, (batch, rows))), c)
        logits = torch.baddbmm(self.fc.bias, h, self.fc.weight.t().expand(passes, self.hidden_size, classes))
        return noise.add_samples_(logits, samples(steps, (batch, classes)))

    def _recur_sites(self, xp, noise, generator, observer, sites):
        w_h = self._op(self.weight[:, self.input_size :])
        h = xp.new_zeros(xp.shape[1], self.hidden_size)
        c = xp.new_zeros(xp.shape[1], self.hidden_size) if self.arch == "lstm" else None
        for t, xp_t in enumerate(xp.unbind(0)):
            pre = self._noisy(torch.addmm(xp_t, self._op(h), w_h.t()), noise, generator, sites, self.gate_names)
            h, c = self.step(pre, c)
            if observer is not None:
                observer(t, h, c)
        return self._noisy(self._out(h), noise, generator, sites, ("out",))

    def step(self, pre: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Element-wise part of one cell: pre-activations -> (h_t, c_t)."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        noise: NoiseModel,
        generator: torch.Generator | None = None,
        observer: StepObserver | None = None,
        sites: str | None = None,
    ) -> torch.Tensor:
        """Noisy logits for inputs of shape (batch, steps, input_size)."""
        trains = torch.is_grad_enabled() and self.weight.requires_grad
        if observer is None and self.parse_sites(sites) is None and trains and self.precision == "fp32":
            fused = _fused_kernel(self, noise, generator, x)
            if fused is not None:  # training on CPU: the compiled layer with its hand-written backward
                from dni.kernels import fused_layer_train

                self._check_input(x)
                lib, sigma = fused
                starts = _stream_starts(generator, x.shape[0] * self.weight.shape[0], x.shape[1], sigma)
                h = fused_layer_train(lib, self.arch, x, self.weight, self.bias, _stream_key(generator), starts, sigma,
                                      _stream_id(generator))
                return noise(self.fc(h), generator)
        if observer is None and not torch.is_grad_enabled() and self.parse_sites(sites) is None:
            xp, inline = self._projection_or_inline(x, noise, generator)
            return self.recur(xp, noise, generator, sites=sites, inline=inline)
        return self.recur(self.project(x), noise, generator, observer, sites)

    def _projection_or_inline(self, x: torch.Tensor, noise: NoiseModel, generator):
        """For a pass over a batch used once (training's accuracy passes): ``(None, inline)``
        where the compiled loop can compute a two-input LSTM's projections itself with the
        bits of :meth:`project` (checked once per shape, see
        :func:`dni.kernels.projection_or_inline`), else ``(project(x), None)``."""
        if (self.arch != "lstm" or self.input_size != 2 or type(self).step is not NoisyLSTM.step
                or self.precision != "fp32" or _fused_kernel(self, noise, generator, x) is None):
            return self.project(x), None
        from dni import kernels

        self._check_input(x)
        batch, steps, _ = x.shape
        xt = x.transpose(0, 1).reshape(steps * batch, 2).contiguous()
        return kernels.projection_or_inline(kernels.library(), xt, self.weight[:, :2], self.bias, steps, batch)


class NoisyRNN(NoisyRecurrent):
    """Vanilla RNN: h_t = tanh(W·[x_t, h_{t-1}] + b + z) (Table III)."""

    gates = 1
    arch = "rnn"
    gate_names = ("h",)
    noisy_products = 1

    def step(self, pre, c):
        return torch.tanh(pre), None


class NoisyLSTM(NoisyRecurrent):
    """LSTM (Fig. 1, Tables I-II) with noise on all four gate pre-activations."""

    gates = 4
    arch = "lstm"
    gate_names = ("i", "f", "g", "o")
    noisy_products = 4

    def step(self, pre, c):
        if gpu_cells.available(pre):  # on a GPU: one kernel each way instead of 9 forward and 13 backward
            return gpu_cells.lstm_cell(pre, c)
        return lstm_gates(pre, c)


def lstm_gates(pre: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM cell's element-wise part in torch ops: pre-activations ``[i | f | g | o]``
    along the last dimension (also for stacked models, dni.stacking) and the cell state
    -> ``(h_t, c_t)``."""
    return lstm_update(lstm_activations(pre), c)


def lstm_activations(pre: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The activated gates ``(i, f, g, o)`` of pre-activations ``[i | f | g | o]``."""
    i, f, g, o = pre.chunk(4, dim=-1)
    return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)


def lstm_update(gates: tuple[torch.Tensor, ...], c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h_t, c_t)`` from the activated gates ``(i, f, g, o)`` and the cell state ``c``."""
    i, f, g, o = gates
    c = f * c + i * g
    return o * torch.tanh(c), c


def plain_cell(model: NoisyRecurrent) -> bool:
    """Whether ``model`` runs the LSTM's or the vanilla RNN's own cell maths (not a
    subclass's), which the compiled loops, the batched repeats and stacks compute too."""
    return type(model).step in (NoisyLSTM.step, NoisyRNN.step)


def _stream_starts(generator, per_step: int, steps: int, sigma: float) -> list[int]:
    """The stream positions of every step's noise, in the order the generic path takes them."""
    return [generator.take(per_step) if sigma else 0 for _ in range(steps)]


def _stream_key(generator) -> int:
    """The stream key of ``generator``; 0 for the noise-free pass without one (no draws)."""
    return 0 if generator is None else generator.key


def _stream_id(generator) -> int:
    """The compiled kernels' number for the stream of ``generator`` (Philox without one)."""
    from dni.kernels import STREAMS

    return STREAMS["philox" if generator is None else generator.stream]


def _fused_kernel(model: NoisyRecurrent, noise: NoiseModel, generator, xp: torch.Tensor):
    """(library, sigma) when the compiled fused step applies, else None.

    It applies on CPU in fp32 with additive Gaussian noise from a dni stream that the
    library draws (Philox; ARS where the CPU has AES instructions) (or no
    noise and no generator: the clean passes of training), in
    inference and in training (with a hand-written backward): it computes the same
    pre-activation + noise and gate maths as :meth:`NoisyRecurrent.step`, drawing the
    same samples, in one pass over memory. At bf16 precision it needs the BLAS's bf16
    GEMM (``lib.bf16``).
    """
    from dni import kernels
    from dni.noise import AdditiveGaussian, CounterGenerator

    if not isinstance(noise, AdditiveGaussian):
        return None
    if not (isinstance(generator, CounterGenerator) or (generator is None and noise.is_noiseless)):
        return None
    if xp.device.type != "cpu" or xp.dtype != torch.float32 or model.hidden_size % 4:
        return None
    if not plain_cell(model):
        return None
    lib = kernels.library()
    if lib is None or not (model.precision == "fp32" or (model.precision == "bf16" and lib.bf16)):
        return None  # no compiled loop for this precision
    if generator is not None and not kernels.draws(lib, generator.stream):
        return None  # ARS without AES instructions
    return lib, float(noise.sigma)


class NoisyGRU(NoisyRecurrent):
    """GRU with noise after each of its matrix-vector products (one bias per gate).

    r = σ(W_r·[x_t, h] + b_r + z), u = σ(W_u·[x_t, h] + b_u + z),
    n = tanh(W_nx·x_t + b_n + z + r ⊙ (W_nh·h + z)), h_t = (1 − u) ⊙ n + u ⊙ h.
    The reset gate multiplies only the recurrent half of the candidate, so that half and
    the input half are two products, each with its own noise: four noisy products per step.
    """

    gates = 3
    arch = "gru"
    gate_names = ("r", "u", "n")
    noisy_products = 4

    def site_names(self) -> tuple[str, ...]:
        return ("r", "u", "nx", "nh", "out")

    def recur(self, xp, noise, generator=None, observer=None, sites=None, inline=None):
        chosen = self.parse_sites(sites)
        hs = self.hidden_size
        w_h = self._op(self.weight[:, self.input_size :])
        w_ru, w_nh = w_h[: 2 * hs], w_h[2 * hs :]
        if chosen is None:  # per step r and u (2H), then n's input and recurrent products (H each); the logits
            draw_ahead(generator, noise, xp.shape[0] * xp.shape[1] * 4 * hs + xp.shape[1] * self.fc.out_features, xp.device)
        h = xp.new_zeros(xp.shape[1], hs)
        for t, xp_t in enumerate(xp.unbind(0)):
            h_op = self._op(h)
            ru = self._noisy(torch.addmm(xp_t[:, : 2 * hs], h_op, w_ru.t()), noise, generator, chosen, ("r", "u"))
            r, u = torch.sigmoid(ru).chunk(2, dim=1)
            n_x = self._noisy(xp_t[:, 2 * hs :].clone(), noise, generator, chosen, ("nx",))  # clone: xp is shared
            n_h = self._noisy(h_op @ w_nh.t(), noise, generator, chosen, ("nh",))
            n = torch.tanh(n_x + r * n_h)
            h = (1 - u) * n + u * h
            if observer is not None:
                observer(t, h, None)
        return self._noisy(self._out(h), noise, generator, chosen, ("out",))


_MODELS: dict[str, type[NoisyRecurrent]] = {"lstm": NoisyLSTM, "rnn": NoisyRNN, "gru": NoisyGRU}


def build_model(
    arch: str, input_size: int, hidden_size: int = HIDDEN_SIZE, num_classes: int = NUM_CLASSES, init: str = "torch"
) -> NoisyRecurrent:
    """Create an untrained classifier of the given architecture, initialised by ``init``."""
    try:
        cls = _MODELS[arch]
    except KeyError:
        raise SpecError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}") from None
    return cls(input_size, hidden_size, num_classes, init)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (the tables' last row)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
