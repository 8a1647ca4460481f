"""Triton where it is installed, and the check every Triton kernel of dni passes before its
first use on a device, once per process (dni.gpu_philox, dni.gpu_cells).

Triton comes with the CUDA builds of torch; the CPU wheel lacks it (``triton`` is then
None and nothing of Triton is used). A kernel that cannot compile or launch on a machine
(a driver, ptxas or Triton version that does not fit), or that computes other numbers than
the torch ops it stands for, must not stop or change a run: it is left out, a warning says
why, and the torch ops run instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

try:
    import triton
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

_outcomes: dict[tuple[str, object], bool] = {}  # (kernels, device) -> whether their check passed


def checked_once(kernels: str, device, self_check: Callable[[object], bool]) -> bool:
    """Whether the ``kernels`` passed ``self_check(device)``, which runs the first time
    they are asked for on ``device`` in this process."""
    if (kernels, device) not in _outcomes:
        _outcomes[kernels, device] = self_check(device)
    return _outcomes[kernels, device]


def verified(check: Callable[[], bool], kernels: str, mismatch: str, instead: str, device) -> bool:
    """Whether ``check`` (run the kernels on ``device``, compare with the torch ops) passes;
    where it returns False or raises, False and a warning: "``kernels`` not used on
    ``device`` (why); ``instead``"."""
    try:
        ok, why = bool(check()), mismatch
    except Exception as exc:  # a compiler, driver or launch failure: leave the kernels out, say why
        ok, why = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not ok:
        warnings.warn(f"dni: {kernels} not used on {device} ({why}); {instead}", RuntimeWarning, stacklevel=3)
    return ok
