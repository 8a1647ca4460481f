import io

from dni.progress import ConsoleReporter


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    rep = ConsoleReporter(out, every=0.0)
    with rep.task("cells", 3) as t:
        for _ in range(3):
            t.advance(1, sigma_val=0.5)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("[cells] 3/3") and "sigma_val=0.5" in lines[-1]
    assert "\x1b" not in out.getvalue()  # no terminal control codes in logs


def test_concurrent_tasks_share_one_rich_display():
    out = FakeTerminal()
    rep = ConsoleReporter(out)
    with rep.task("models", 2) as a, rep.task("cells", 4) as b:
        assert rep._progress is not None and len(rep._progress.tasks) == 2
        a.advance(2)
        b.advance(4)
    assert rep._progress is None  # stopped when the last task ended
    assert "models" in out.getvalue() and "cells" in out.getvalue()
