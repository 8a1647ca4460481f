"""Integration test of the Slurm executor on a real (single-node) Slurm cluster.

`.ci/run` starts one with scripts/slurm-local.sh and sets SLURM_CONF and DNI_REQUIRE_SLURM=1;
elsewhere the test is skipped unless a cluster is reachable.
"""

import os
import shutil
import subprocess

import pytest

from tests.helpers import CLI_SWEEP, leftovers, run_dni


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return res.returncode == 0 and any(s in res.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture
def slurm():
    if not _slurm_up():
        if os.environ.get("DNI_REQUIRE_SLURM") == "1":
            pytest.fail("DNI_REQUIRE_SLURM=1 but no Slurm cluster answers (sinfo)")
        pytest.skip("no Slurm cluster")


def test_slurm_sweep_equals_local_sweep(slurm, reference_csv, tmp_path, real_data):
    store, out = tmp_path / "store", tmp_path / "results.csv"
    res = run_dni([*CLI_SWEEP, "--store", store, "--out", out, "--executor", "slurm", "--mem-gb", "1", "--time-min", "10"], data=real_data)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.read_bytes() == reference_csv.read_bytes()
    assert leftovers(store) == []
    # The array tasks really ran under Slurm: submitit left one log folder per job.
    logs = list((store / "slurm").rglob("*_log.out"))
    assert len(logs) >= 2 + 6  # two training tasks, six (model, sigma_val) evaluation tasks
    again = run_dni([*CLI_SWEEP, "--store", store, "--out", out, "--executor", "slurm"], data=real_data)
    assert again.returncode == 0 and "already done" in again.stdout
