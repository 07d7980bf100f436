"""The benchmark scripts' guards that protect device time."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_shapes_run_refuses_to_resume_where_no_earlier_run_is(tmp_path):
    # a RESUME=1 device call that lands on a fresh machine used to make new data and retrain the tokenizer from
    # nothing, spending the call on a worse model; it must stop at once, before any data is made
    env = {**os.environ, "SMOKE": "1", "RESUME": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable}  # fmt: skip
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks/training/shapes_run.sh")], check=False, cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "RESUME=1" in result.stderr and "nothing to resume" in result.stderr
    assert not (tmp_path / "work" / "train").exists()
