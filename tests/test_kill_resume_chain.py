"""The chain survives SIGKILL: benchmarks/kill_resume.py, short version (a kill in each data stage)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_killed_reproduce_resumes_to_identical_shards(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/kill_resume.py", "--config", "configs/demo-small.yaml",
                          "--kills", "1", "--stages", "acquire,translate,build", "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=1200)
    last = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert last.startswith("kills=") and int(last.split()[0].split("=")[1]) >= 1, last
    assert "identical=True lost=0 duplicated=0" in last
