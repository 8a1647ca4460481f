"""The Triton kernel of dni's Philox/Box-Muller stream (dni.gpu_philox), which GPUs draw
with: run here through Triton's interpreter on CPU tensors, against the torch ops that
define the stream on every device. (The interpreter must be chosen before Triton is
imported, hence a process of its own.)"""

import pytest
import torch

from dni import gpu_philox, kernels
from tests.helpers import compile_for_gpus, run_interpreted

pytestmark = pytest.mark.skipif(gpu_philox.triton is None, reason="Triton is not installed")

CHECKS = """
import torch
from dni import gpu_philox, kernels
from tests.helpers import compile_for_gpus, run_interpreted
from dni.noise import PhiloxGenerator

cpu = torch.device("cpu")
span = 3 * 4 * gpu_philox.BLOCKS_PER_PROGRAM + 6
for n, key, counter in [
    (1, 0, 0),
    (4001, 1234, 77),  # a tail of one sample in the last block
    (span, 2**63 + 12345, 2**32 - 3),  # several programs; the counter's high word turns over
    (10, 0xDEADBEEFCAFEBABE, 2**40 + 5),
]:
    drawn = gpu_philox.normal(n, key, counter, cpu)
    assert drawn.dtype == torch.float32 and drawn.shape == (n,)
    assert torch.equal(drawn, kernels.normal_torch(n, key, counter)), (n, key, counter)

# As on a GPU: a pass draws its samples ahead, one kernel launch per chunk, and each draw
# takes its own from there.
kernels.library = lambda: None
launches = []
kernels.normal_on = lambda n, key, counter, device, out=None, stream="philox": (launches.append(n), gpu_philox.normal(n, key, counter, device, out))[1]
PhiloxGenerator.draws_ahead_on = staticmethod(lambda device: True)
PhiloxGenerator.AHEAD_CHUNK = 1000
gen, plain = PhiloxGenerator(7), PhiloxGenerator(7)
gen.prefetch(2500, cpu)
for n in (400, 400, 1000, 700):
    assert torch.equal(gen.normal((n,), cpu, torch.float32), kernels.normal_torch(n, 7, plain.take(n)))
assert launches == [1000, 1000, 700], launches
assert gpu_philox.self_check(cpu)  # the check before a device's first use passes
print("ok")
"""


def test_the_triton_kernel_draws_the_stream_bit_for_bit_and_serves_draws_ahead():
    run_interpreted(CHECKS)


@pytest.mark.parametrize("wide", [False, True])
def test_the_kernel_compiles_for_the_gpus(wide):
    """For the integer types Triton gives the arguments by their values: small ones, and
    64-bit sizes, keys and counters (a counter of 2^63 or more is unsigned)."""
    ints = dict.fromkeys(["n", "blocks", "k0_in", "k1_in"], "i64" if wide else "i32")
    compile_for_gpus(gpu_philox._philox_normal, {"out_ptr": "*fp32", **ints, "counter": "u64" if wide else "i32",
                                                 "BLOCK": "constexpr"}, {"BLOCK": gpu_philox.BLOCKS_PER_PROGRAM}, fp_fusion=False)


def test_draws_on_a_gpu_take_the_triton_kernel_and_the_cpu_never_does(monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_philox, "available", lambda device: device.type != "cpu")
    monkeypatch.setattr(gpu_philox, "normal", lambda n, key, counter, device, out=None: calls.append((n, key, counter, device.type)))
    kernels.normal_on(8, 5, 2, torch.device("meta"))
    assert calls == [(8, 5, 2, "meta")]
    assert torch.equal(kernels.normal_on(8, 5, 2, torch.device("cpu")), kernels.normal_torch(8, 5, 2)) and len(calls) == 1


def test_a_kernel_that_fails_or_draws_other_samples_is_not_used_and_a_warning_says_why(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(gpu_philox, "normal", broken)
    with pytest.warns(RuntimeWarning, match="Philox stream is not used on cpu .RuntimeError: no kernel image"):
        assert gpu_philox.self_check(torch.device("cpu")) is False
    monkeypatch.setattr(gpu_philox, "normal", lambda n, key, counter, device, out=None: kernels.normal_torch(n, key + 1, counter))
    with pytest.warns(RuntimeWarning, match="other samples than the torch ops"):
        assert gpu_philox.self_check(torch.device("cpu")) is False
    checks = []
    monkeypatch.setattr("dni.gpu_triton._outcomes", {})
    monkeypatch.setattr(gpu_philox, "self_check", lambda device: checks.append(device) or True)
    assert gpu_philox.available(torch.device("cuda", 1)) and gpu_philox.available(torch.device("cuda", 1))
    assert checks == [torch.device("cuda", 1)] and not gpu_philox.available(torch.device("cpu"))
