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
    floor = re.fullmatch(r"whole build's CPU floor here: (\d+\.\d\d) CPU s on (\d+) CPUs = (\d+\.\d+) s at best, "
                         r"throughput_vs_copy <= \d+\.\d\d on this machine", lines[-3])
    assert floor and float(floor.group(1)) > 0 and int(floor.group(2)) >= 1
    build_row = next(line for line in lines if line.startswith("whole build (join, policy, shards, manifest)"))
    assert float(build_row.split()[-1]) == float(floor.group(1))  # the CPU column of the same run
    assert re.fullmatch(r"shards_vs_copy=\d+\.\d\d", lines[-2])
    ratio = float(re.fullmatch(r"throughput_vs_copy=(\d+\.\d\d)", lines[-1]).group(1))
    assert 0 < ratio < 10
