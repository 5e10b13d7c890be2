"""The chain survives SIGKILL in every stage: benchmarks/kill_resume.py, short version (one kill per stage).

configs/demo-kill.yaml's chain, killed once at a random moment of each of its five stages (from a
copy of the root at that stage's start) and resumed: every resumed root equals the uninterrupted
one at that stage's end -- the pre-trained weights tensor by tensor -- nothing lost or duplicated.
"""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = "acquire,translate,build,pretrain,evaluate"


@pytest.mark.slow
def test_a_kill_in_each_stage_resumes_to_the_uninterrupted_root(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/kill_resume.py", "--config", "configs/demo-kill.yaml",
                          "--kills", "1", "--stages", STAGES, "--seed", "3", "--workdir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert lines[-1] == "kills=5 per_stage=1,1,1,1,1 identical=True lost=0 duplicated=0", lines[-1]
    assert lines[-2].startswith("stages covered: acquire, translate, build, pretrain, evaluate;"), lines[-2]
    kills = [x for x in lines if " kill 1/1: " in x]
    assert [x.split()[0] for x in kills] == STAGES.split(",")
    assert all(x.endswith(": identical") for x in kills), kills
