"""Processes sharing a report's work directory (``--jobs``): the helpers' command, their threads, and what
happens to them when the first process fails."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from unirec.experiments.runs import helpers, start_helpers, wait_helpers


def test_helpers_get_the_command_less_fresh_and_a_share_of_the_cores(tmp_path, monkeypatch):
    """``--jobs``: a helper reruns the script with ``--helper``, never ``--fresh`` (emptying the work
    directory again would delete the runs the first process has started), and one thread per share; a
    helper that fails stops the report, naming its log."""
    script = tmp_path / "script.py"
    script.write_text(
        "import json, os, sys\n"
        "open(os.path.join(sys.argv[1], 'argv.json'), 'w').write(json.dumps([sys.argv[1:], os.environ['OMP_NUM_THREADS']]))\n"
        "sys.exit(5 if '--fail' in sys.argv else 0)\n"
    )
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    threads = torch.get_num_threads()
    try:
        work = str(tmp_path)
        helpers = start_helpers(str(script), Namespace(jobs=2, work=work), [work, "--fresh", "--seeds", "2"])
        wait_helpers(helpers)
        assert json.loads((tmp_path / "argv.json").read_text()) == [[work, "--seeds", "2", "--helper"], "2"]
        assert torch.get_num_threads() == 2
        failing = start_helpers(str(script), Namespace(jobs=2, work=work), [work, "--fail"])
        with pytest.raises(SystemExit, match="helper-1.log"):
            wait_helpers(failing)
        assert start_helpers(str(script), Namespace(jobs=1, work=work), [work]) == []
    finally:
        torch.set_num_threads(threads)


def test_a_failing_first_process_stops_its_helpers(tmp_path):
    """The first process raising inside ``helpers`` terminates them (they would train on for hours); on a
    normal exit it waits for them."""
    script = tmp_path / "script.py"
    script.write_text("import sys, time\ntime.sleep(float(sys.argv[1]))\n")
    args = Namespace(jobs=2, work=str(tmp_path))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="a run failed"):
            with helpers(str(script), args, ["60"]) as procs:
                raise RuntimeError("a run failed")
        assert procs[0][0].poll() is not None  # stopped, not left sleeping
        with helpers(str(script), args, ["0.5"]) as procs:
            pass
        assert procs[0][0].returncode == 0  # set by the wait on leaving (None while it runs)
        with helpers(str(script), args, ["60"], start=False) as procs:
            assert procs == []
    finally:
        torch.set_num_threads(threads)
