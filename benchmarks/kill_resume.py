"""Kill `ccrk reproduce` with SIGKILL at random moments, resume, and compare with an uninterrupted run.

    python benchmarks/kill_resume.py                       # 20 kills per stage on configs/demo.yaml
    python benchmarks/kill_resume.py --kills 2 --config configs/demo-small.yaml --stages acquire,translate,build

For each stage and each kill: start `ccrk reproduce` on the killed root, wait until it announces the
stage (its "==> stage" line), sleep a random part of that stage's duration in the uninterrupted run,
then SIGKILL the whole process group. After all kills a last run resumes to the end. The final
dataset shards (sha256 per shard) and sample counts must equal those of the uninterrupted run.
Last line: ``kills=N identical=True|False lost=0 duplicated=0``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("acquire", "translate", "build", "pretrain", "evaluate")


def ccrk_command(config: str, root: str) -> list[str]:
    return [sys.executable, "-m", "ccrk.app.cli", "reproduce", "--config", config, "--root", root]


def run_to_end(config: str, root: str, log) -> dict[str, tuple[float, float]]:
    """Run uninterrupted; return each stage's (start, end) offsets in seconds."""
    t0 = time.perf_counter()
    marks: list[tuple[str, float]] = []
    proc = subprocess.Popen(ccrk_command(config, root), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    for line in proc.stdout:
        log.write(line)
        if line.startswith("==> "):
            marks.append((line[4:].strip(), time.perf_counter() - t0))
    if proc.wait() != 0:
        raise SystemExit(f"reproduce failed on {root}; see the log")
    marks.append(("end", time.perf_counter() - t0))
    windows = {}
    for (name, start), (_, end) in zip(marks, marks[1:]):
        stage = name.split()[0]
        windows[stage] = (start, end)
    return windows


def run_and_kill(config: str, root: str, stage: str, delay: float, log) -> bool:
    """Start a resume; SIGKILL it ``delay`` s after it announces ``stage``. False if it finished first."""
    import select

    proc = subprocess.Popen(ccrk_command(config, root), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    fd = proc.stdout.fileno()
    announced_at = None
    buffer = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            chunk = os.read(fd, 65536)
            if chunk:
                log.write(chunk.decode("utf-8", "replace"))
                buffer = (buffer + chunk)[-4096:]
                if announced_at is None and f"==> {stage}".encode() in buffer:
                    announced_at = time.perf_counter()
        if proc.poll() is not None:
            return False
        if announced_at is not None and time.perf_counter() - announced_at >= delay:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True


def dataset_fingerprint(root: str) -> dict:
    """Shard name -> sha256, plus sample keys (to count lost and duplicated samples)."""
    import tarfile

    base = os.path.join(root, "datasets")
    dirs = [os.path.join(dp) for dp, dn, fn in os.walk(base) if "manifest.duckdb" in fn]
    if len(dirs) != 1:
        return {"datasets": dirs}
    shards_dir = os.path.join(dirs[0], "shards")
    shas, keys = {}, []
    for name in sorted(os.listdir(shards_dir)):
        if not name.endswith(".tar"):
            continue
        path = os.path.join(shards_dir, name)
        with open(path, "rb") as f:
            shas[name] = hashlib.sha256(f.read()).hexdigest()
        with tarfile.open(path) as tar:
            keys += [m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]
    return {"dataset": os.path.relpath(dirs[0], root), "shards": shas, "keys": keys}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--kills", type=int, default=20, help="kills per stage")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the two data roots here (default: a temp dir)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="kill-resume-")
    clean_root, killed_root = os.path.join(work, "uninterrupted"), os.path.join(work, "killed")
    os.makedirs(work, exist_ok=True)
    log = open(os.path.join(work, "log.txt"), "a", buffering=1)
    print(f"work dir {work}")

    windows = run_to_end(args.config, clean_root, log)
    print("uninterrupted stage windows (s): " + ", ".join(f"{k} {a:.0f}-{b:.0f}" for k, a, b in
                                                         ((k, *v) for k, v in windows.items())))
    kills = 0
    for stage in [s for s in args.stages.split(",") if s]:
        if stage not in windows:
            print(f"stage {stage} not in this config's chain; skipped")
            continue
        start, end = windows[stage]
        for i in range(args.kills):
            delay = rng.uniform(0, max(end - start, 0.5))
            killed = run_and_kill(args.config, killed_root, stage, delay, log)
            kills += killed
            print(f"{stage} #{i + 1}: {'killed' if killed else 'finished before the kill'} after {delay:.1f} s",
                  flush=True)
            if not killed:
                break  # the stage is done on this root: later kills of it would not land
    run_to_end(args.config, killed_root, log)  # the last resume, to the end

    clean, resumed = dataset_fingerprint(clean_root), dataset_fingerprint(killed_root)
    identical = clean.get("shards") == resumed.get("shards") and clean.get("dataset") == resumed.get("dataset")
    ref = set(clean.get("keys", []))
    got = resumed.get("keys", [])
    lost = len(ref - set(got))
    duplicated = len(got) - len(set(got))
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump({"kills": kills, "identical": identical, "lost": lost, "duplicated": duplicated,
                   "clean": {k: v for k, v in clean.items() if k != "keys"},
                   "resumed": {k: v for k, v in resumed.items() if k != "keys"}}, f, indent=2)
    print(f"kills={kills} identical={identical} lost={lost} duplicated={duplicated}")
    return 0 if identical and not lost and not duplicated else 1


if __name__ == "__main__":
    sys.exit(main())
