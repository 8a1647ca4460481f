"""The allocator setting of dni.memory: freed buffers are reused without fresh pages."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_CODE = """
import resource, torch
from dni.memory import keep_freed_memory

def faults_of_a_loop():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(13 << 20, dtype=torch.uint8).fill_(1)  # a strokes step's gates: 13 MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_a_loop()
print(keep_freed_memory(), keep_freed_memory(), default, faults_of_a_loop(), faults_of_a_loop())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_buffers_are_reused_without_page_faults():
    res = subprocess.run([sys.executable, "-c", _CODE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    applied, again, default, first, later = res.stdout.split()
    assert applied == again == "True"
    pages = (13 << 20) // 4096
    assert int(default) > 5 * pages  # glibc's default: fresh pages for many of the 20 buffers
    assert int(first) < 2 * pages and int(later) < pages // 4  # kept: at most the first buffer faults
