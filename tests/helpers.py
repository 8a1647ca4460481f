"""Helpers shared by the tests that run dni in subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

# A tiny sweep (2 models x 3 sigma_val x 2 repeats) on the first digits of the real data.
CLI_SWEEP = ["sweep", "--arch", "rnn", "--data", "rows", "--sigma-train", "0,1", "--sigma-val", "0:1:0.5", "--repeats", "2",
             "--epochs", "1", "--limit-train", "300", "--val-size", "50", "--limit-test", "100", "--device", "cpu"]


def run_dni(args, env_extra=None, data=None):
    """Run ``python -m dni ARGS`` with ``DNI_DATA_DIR=data``."""
    env = {**os.environ, **({"DNI_DATA_DIR": str(data)} if data else {}), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "dni", *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


def leftovers(root):
    """Temporary or partial files under ``root``."""
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".part")]


def run_interpreted(code: str) -> None:
    """Run ``code`` (which prints ``ok`` at its end) in a process whose Triton kernels run
    on CPU tensors through Triton's interpreter (chosen before Triton is imported)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


#: GPU generations the Triton kernels are compiled for in the tests (A100; H100 and H200).
CUDA_CAPABILITIES = (80, 90)


def compile_for_gpus(kernel, signature: dict, constexprs: dict, fp_fusion: bool = True) -> None:
    """Compile a Triton kernel ahead of time with Triton's own compiler and ptxas for each
    of :data:`CUDA_CAPABILITIES`, as a GPU would at its first launch; no GPU needed. This
    catches what the interpreter accepts but the compiler does not."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for capability in CUDA_CAPABILITIES:
        compiled = triton_compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", capability, 32), options={"enable_fp_fusion": fp_fusion})
        assert compiled.asm["cubin"], (kernel, capability)
