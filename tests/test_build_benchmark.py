"""benchmarks/build.py runs end to end (at a tiny size) and ends with its ratio line."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_benchmark_prints_its_rows_and_ratio_last():
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "build.py"), "--images", "300",
                          "--repeat", "1", "--image-size", "64", "--shard-size", "100"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert "issue asks for >= 5,000 images" in out.stderr
    for row in ("copy (shutil.copyfile + fsync)", "shards step, a preadv per image (no mapping)",
                "whole build (join, policy, shards, manifest)"):
        assert any(line.startswith(row) for line in lines), row
    assert re.fullmatch(r"shards_vs_copy=\d+\.\d\d", lines[-2])
    ratio = float(re.fullmatch(r"throughput_vs_copy=(\d+\.\d\d)", lines[-1]).group(1))
    assert 0 < ratio < 10
