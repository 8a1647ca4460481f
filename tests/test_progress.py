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


def test_eta_counts_from_the_first_unit_not_from_the_start(monkeypatch):
    """Cells wait for their models: 900 s of waiting must not enter the rate."""
    import dni.progress

    clock = iter([0.0, 900.0, 920.0, 940.0])
    monkeypatch.setattr(dni.progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    rep = ConsoleReporter(out, every=0.0)
    with rep.task("cells", 100) as t:  # created at t = 0
        t.advance(10)  # t = 900: the first unit, no rate yet
        t.advance(10)  # t = 920: 10 units in 20 s
        t.advance(10)  # t = 940: 20 units in 40 s, 70 left
    lines = out.getvalue().splitlines()
    assert lines[0] == "[cells] 10/100 elapsed 900s eta ?"
    assert lines[1] == "[cells] 20/100 elapsed 920s eta 160s"
    assert lines[2] == "[cells] 30/100 elapsed 940s eta 140s"
