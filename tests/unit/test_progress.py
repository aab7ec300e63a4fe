"""Progress output: a bar on a terminal, plain lines at the configured interval elsewhere."""

import io

from unirec.progress import PlainProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_only_every_interval_and_once_at_close():
    now = [0.0]
    out = io.StringIO()
    bar = PlainProgress(100, 0, 30.0, out, clock=lambda: now[0])
    for _ in range(100):
        now[0] += 1.0  # a step a second: lines at 30, 60, 90 s, then the last at close
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "progress 30/100",
        "progress 60/100",
        "progress 90/100",
        "progress 100/100",
    ]
    assert "\r" not in out.getvalue()
    assert "1.0 steps/s" in lines[0] and "about 70 s left" in lines[0]


def test_resumed_rate_counts_only_this_runs_steps():
    now = [0.0]
    out = io.StringIO()
    bar = PlainProgress(100, 50, 0.0, out, clock=lambda: now[0])
    now[0] = 10.0
    bar.update(5)
    assert out.getvalue().startswith("progress 55/100 (55%), 0.5 steps/s, 10 s elapsed, about 90 s left")


def test_a_terminal_gets_the_tqdm_bar_and_a_log_does_not():
    tty = _Terminal()
    bar = progress_bar(3, stream=tty)
    bar.update()
    bar.close()
    assert "\r" in tty.getvalue()  # the live bar redraws in place
    assert isinstance(progress_bar(3, stream=io.StringIO()), PlainProgress)


def test_disabled_writes_nothing():
    out = io.StringIO()
    bar = progress_bar(3, enabled=False, every_s=0, stream=out)
    bar.update()
    bar.set_postfix(loss="1")
    bar.close()
    assert out.getvalue() == ""
