"""The sittings record of long runs: written as it goes, kept when a run is killed."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dni.sittings import Sitting, read_sittings, summary

ROOT = Path(__file__).resolve().parent.parent


def _only_record(results):
    records = read_sittings(results)
    assert len(records) == 1
    return records[0]


def test_a_sitting_is_recorded_while_it_runs_and_when_it_ends(tmp_path):
    with Sitting(tmp_path, {"preset": "p"}, heartbeat=0.05) as s:
        assert _only_record(tmp_path)["finished"] is False
        time.sleep(0.3)
        running = _only_record(tmp_path)
        assert running["finished"] is False and 0.1 < running["seconds"] <= 0.3 + 0.05
        s.stage("sweep lstm rows", 1.5)
        assert _only_record(tmp_path)["stages_seconds"] == {"sweep lstm rows": 1.5}
    done = _only_record(tmp_path)
    assert done["finished"] is True and done["preset"] == "p" and done["seconds"] >= 0.3
    assert not s._thread.is_alive()


def test_a_sitting_stopped_by_an_exception_says_so(tmp_path):
    with pytest.raises(KeyboardInterrupt), Sitting(tmp_path, {}, heartbeat=10):
        raise KeyboardInterrupt
    record = _only_record(tmp_path)
    assert record["finished"] is False and record["stopped_by"] == "KeyboardInterrupt"


def test_a_sitting_killed_by_sigkill_keeps_its_time_to_within_a_heartbeat(tmp_path):
    code = ("import sys, time; from pathlib import Path; from dni.sittings import Sitting\n"
            "with Sitting(Path(sys.argv[1]), {}, heartbeat=0.1):\n"
            "    print('started', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record = _only_record(tmp_path)
    assert record["finished"] is False and 0.8 <= record["seconds"] <= 1.5


def test_sittings_of_other_runs_are_not_counted(tmp_path):
    for preset, seconds, cpu in (("paper", 100.0, "A"), ("smoke", 7.0, "B"), ("paper", 20.0, "A"), ("paper", 5.0, None)):
        folder = tmp_path / "sittings"
        folder.mkdir(exist_ok=True)
        n = len(list(folder.iterdir()))
        record = {"preset": preset, "started_unix": 1e9 + n, "seconds": seconds, **({"cpu": cpu} if cpu else {})}
        (folder / f"{n}.json").write_text(json.dumps(record))
    (tmp_path / "sittings" / "broken.json").write_text("{not json")
    paper = summary(read_sittings(tmp_path, preset="paper"))
    assert paper["sittings"] == 3 and paper["all_sittings_seconds"] == 125.0
    assert [s["seconds"] for s in paper["sittings_detail"]] == [100.0, 20.0, 5.0]
    # the machines they ran on, in order of first appearance; None: a record that kept none
    assert paper["sittings_cpus"] == ["A", None]
    assert [s["cpu"] for s in paper["sittings_detail"]] == ["A", "A", None]


def test_sittings_started_in_the_same_second_are_all_kept(tmp_path):
    for _ in range(3):
        with Sitting(tmp_path, {"preset": "p"}, heartbeat=10):
            pass
    assert summary(read_sittings(tmp_path, preset="p"))["sittings"] == 3
