"""Kill `ccrk reproduce` with SIGKILL at random moments of each stage, resume, and compare with an uninterrupted run.

    python benchmarks/kill_resume.py                        # 20 kills in each stage of configs/demo-kill.yaml
    python benchmarks/kill_resume.py --kills 3 --stages acquire,pretrain

1. The uninterrupted run. ``ccrk reproduce`` runs once on ``WORK/root``. Each time it announces a
   stage (its "==> stage" line) its process group is stopped (SIGSTOP), the data root is copied to
   ``WORK/states/NN-stage`` and the group continued (SIGCONT): a stopped process writes nothing,
   so the copy is the root as a kill at that moment would leave it, which is the state at that
   stage's start (what the earlier stages made, plus at most the few milliseconds of the stage
   that ran before the line was read). The pauses are left out of the stage windows: a stage's
   window runs from its announcement to the next one (the last stage's to its "reproduce:
   stages" table). The root at a stage's end is the copy taken at the next announcement (the
   finished root, ``WORK/states/final``, for the last stage). A stage is named by its line's first
   word ("==> build + verify" is build). Every run uses the one root path, ``WORK/root``:
   artifacts record absolute paths (a source's source.json, a report's checkpoint), so a copy is
   the same state only in the same place.
2. For each covered stage, ``--kills`` independent trials, one after another (the demo serves its
   corpus on a fixed port): the root is replaced by a fresh copy of the state at that stage's
   start, ``ccrk reproduce`` starts, and at a moment drawn uniformly from the stage's
   uninterrupted duration, measured from the stage's announcement, its process group is stopped
   and then SIGKILLed. A trial whose run reached its next stage (or its end) before that moment
   is no kill of the stage: it is counted as a miss and the moment re-drawn, on a fresh copy
   (at most ``--max-tries`` tries per stage). Then ``ccrk reproduce`` runs again on the killed
   root -- the resume -- until it announces the stage after the killed one (then it is killed:
   the stage is done) or, for the last stage, to its end.
3. The resumed root is compared with the uninterrupted root at that stage's end, file by file
   (every file but hidden ones, lock files and img2dataset's log): the same files, with the same
   bytes, except where bytes differ from run to run by design, which are compared by content:
   JSON without the timing keys listed in VOLATILE_KEYS, image shards from img2dataset by their
   members (their order and mtimes vary), their parquet files by rows, DuckDB files (catalog,
   manifest) by their tables' rows, safetensors files tensor by tensor (sha256 of each tensor's
   bytes: the pre-training run's final weights must equal the uninterrupted run's bit for bit).
   Items are counted too: images in the source shards, translated texts, samples in the dataset
   shards, pre-training steps in the metrics log, languages in the reports; ``lost`` = items of
   the uninterrupted root missing from a resumed one, ``duplicated`` = items a resumed one holds
   more often.

The runs share one Prefect API server started here (unless PREFECT_API_URL names one): a temporary
server per run would add its start-up to every one of the ~2 x stages x kills runs.
Output: the stage windows, a line per trial, the covered stages, and as the last line
``kills=N per_stage=a,b,... identical=True|False lost=L duplicated=D`` (N = kills made, per_stage =
kills per covered stage in the order printed). Exit 0 only when every covered stage got its kills,
every resumed root was identical and nothing was lost or duplicated.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import hashlib
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
END = "end"  # the window mark after the last stage
END_LINE = "reproduce: stages"  # the title of the stage table the chain prints after its last stage
RUN_TIMEOUT = 1800.0  # seconds without a line of output before a run is called stuck
# JSON keys whose values differ between two uninterrupted runs (timings), or between an
# uninterrupted and a resumed one by design (what the resume found done or redid).
VOLATILE_KEYS = frozenset({
    "wall_s", "images_per_s", "duration", "start_time", "end_time", "seconds", "samples_per_s",
    "rows_attempted", "shards_redone", "resumed_from",
})
# DuckDB columns left out: when a row was written, and the catalog's stats, which say what the run that
# recorded the artifact did (a resumed translation's stats count the texts it found stored).
VOLATILE_COLUMNS = frozenset({"created_at", "stats"})
# Compared neither by bytes nor by content: img2dataset's log and the artifact locks (a pid).
# A DuckDB write-ahead log is read with its database file.
IGNORED = ("sources/*/img2dataset.log", "*.lock", "*.duckdb.wal")


# ---------------------------------------------------------------------- running ccrk reproduce


class Run:
    """One ``ccrk reproduce`` in a process group of its own, its output read line by line (into the log)."""

    def __init__(self, config: str, root: str, env: dict, log):
        self.log = log
        log.write(f"\n---- ccrk reproduce --config {config} --root {root}\n")
        self.proc = subprocess.Popen([sys.executable, "-m", "ccrk.app.cli", "reproduce", "--config", config,
                                      "--root", root], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.fd, self.buffer, self.eof = self.proc.stdout.fileno(), b"", False

    def line(self, timeout: float) -> str | None:
        """The next line of output; None if none came within ``timeout`` s or the output ended (``eof``)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            self.eof = not chunk
            self.buffer += chunk
        if not self.buffer:
            return None
        line, sep, self.buffer = self.buffer.partition(b"\n")
        text = line.decode("utf-8", "replace")
        self.log.write(text + "\n")
        return text

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group; wait until its processes are gone (10 s at most)."""
        self.signal(signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.log.write("---- killed\n")
        self.close()

    def close(self) -> None:
        self.proc.stdout.close()


def event(line: str) -> str | None:
    """The stage a line announces (its first word: "build + verify" is build), END for the table
    after the last stage, else None."""
    if line.startswith("==> "):
        return line[4:].split()[0].lower()
    return END if line.strip().startswith(END_LINE) else None


def next_event(run: Run) -> str | None:
    """The next stage announcement or END; None when the output ends first."""
    while True:
        line = run.line(RUN_TIMEOUT)
        if line is None:
            if not run.eof:
                raise SystemExit(f"ccrk reproduce printed nothing for {RUN_TIMEOUT:.0f} s; see the log")
            return None
        found = event(line)
        if found:
            return found


def copy_root(src: str, dst: str) -> None:
    """``dst`` made a copy of ``src`` (an empty folder when ``src`` is not there yet)."""
    shutil.rmtree(dst, ignore_errors=True)
    if os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True)
    else:
        os.makedirs(dst)


def uninterrupted(config: str, root: str, states: str, env: dict, log) -> list[tuple[str, float, str]]:
    """Run the chain once on ``root``; a copy of the root at each stage's announcement.
    Returns (stage, seconds from the start to its announcement, the copy's path), pauses excluded,
    with (END, seconds, the finished root's copy) last."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(states, ignore_errors=True)
    os.makedirs(states)
    t0, paused, marks = time.perf_counter(), 0.0, []
    run = Run(config, root, env, log)
    while (found := next_event(run)) is not None:
        at = time.perf_counter() - t0 - paused
        if found == END:
            marks.append((END, at, ""))
            continue
        run.signal(signal.SIGSTOP)
        stopped = time.perf_counter()
        path = os.path.join(states, f"{len(marks):02d}-{found}")
        copy_root(root, path)
        run.signal(signal.SIGCONT)
        paused += time.perf_counter() - stopped
        marks.append((found, at, path))
    code = run.proc.wait()
    run.close()
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {code}); see the log")
    if not marks or marks[-1][0] != END:
        marks.append((END, time.perf_counter() - t0 - paused, ""))
    final = os.path.join(states, "final")
    copy_root(root, final)
    return [(stage, at, path or final) for stage, at, path in marks]


# ---------------------------------------------------------------------- comparing roots


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _strip(obj):
    """``obj`` without VOLATILE_KEYS, at any depth."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _json_cell(value):
    """A DuckDB JSON column's value, its volatile keys dropped."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return _strip(json.loads(value))
        except ValueError:
            pass
    return value


def tensor_digests(path: str) -> dict:
    """A safetensors file tensor by tensor: name -> sha256 of dtype, shape and bytes (and its metadata)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = f.read()
    out = {"__metadata__": _canonical(header.pop("__metadata__", {}))}
    for name, spec in header.items():
        begin, end = spec["data_offsets"]
        out[name] = _sha(f"{spec['dtype']}{spec['shape']}".encode() + data[begin:end])
    return out


def duckdb_rows(path: str) -> dict:
    """Each table's rows (sorted, JSON columns without their volatile keys)."""
    import duckdb

    con = duckdb.connect(path, read_only=True)
    try:
        out = {}
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables "
                                    "WHERE table_type = 'BASE TABLE' ORDER BY table_name").fetchall():
            cur = con.execute(f'SELECT * FROM "{table}"')
            names = [d[0] for d in cur.description]
            rows = [_canonical({n: _json_cell(v) for n, v in zip(names, row) if n not in VOLATILE_COLUMNS})
                    for row in cur.fetchall()]
            out[table] = _sha("\n".join(sorted(rows)).encode())
        return out
    finally:
        con.close()


def tar_members(path: str) -> str:
    """img2dataset's shard by its members: (name, sha256), sorted."""
    with tarfile.open(path) as tar:
        return _sha(_canonical(sorted((m.name, _sha(tar.extractfile(m).read())) for m in tar if m.isfile())).encode())


def parquet_rows(path: str) -> str:
    import pyarrow.parquet as pq

    return _sha("\n".join(sorted(_canonical(r) for r in pq.read_table(path).to_pylist())).encode())


def digest(path: str, rel: str):
    """What is compared of one file (a string, or a dict whose entries are compared one by one)."""
    try:
        return _digest(path, rel)
    except Exception as exc:  # a file a kill left cut short: it differs, it does not stop the benchmark
        return f"unreadable ({type(exc).__name__}: {exc})"


def _digest(path: str, rel: str):
    if rel.endswith(".duckdb"):
        return duckdb_rows(path)
    if rel.endswith(".safetensors"):
        return tensor_digests(path)
    if fnmatch.fnmatch(rel, "sources/*/shards/*.tar"):
        return tar_members(path)
    if fnmatch.fnmatch(rel, "sources/*/shards/*.parquet"):
        return parquet_rows(path)
    with open(path, "rb") as f:
        data = f.read()
    if rel.endswith(".json"):
        return _sha(_canonical(_strip(json.loads(data))).encode())
    if rel.endswith(".jsonl"):
        return _sha("\n".join(_canonical(_strip(json.loads(x))) for x in data.splitlines() if x.strip()).encode())
    return _sha(data)


def compared_files(root: str) -> list[str]:
    """Every file under ``root`` (relative paths) but hidden ones and IGNORED."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not name.startswith(".") and not any(fnmatch.fnmatch(rel, p) for p in IGNORED):
                out.append(rel)
    return sorted(out)


def items(root: str, rel: str) -> list:
    """The items one file holds, for counting lost and duplicated ones (none if it cannot be read)."""
    try:
        return _items(os.path.join(root, rel), rel)
    except Exception:
        return []


def _items(path: str, rel: str) -> list:
    if fnmatch.fnmatch(rel, "sources/*/shards/*.tar"):
        with tarfile.open(path) as tar:
            return [("image", rel.split("/")[1], json.loads(tar.extractfile(m).read()).get("image_key"))
                    for m in tar if m.name.endswith(".json")]
    if fnmatch.fnmatch(rel, "datasets/*/shards/*.tar"):
        with tarfile.open(path) as tar:
            return [("sample", rel.split("/shards/")[0], m.name.rsplit(".", 1)[0])
                    for m in tar if m.name.endswith(".json")]
    if fnmatch.fnmatch(rel, "translations/*/part-*.parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["text_sha", "tgt_lang"]).to_pylist()
        return [("translation", r["tgt_lang"], r["text_sha"]) for r in table]
    if fnmatch.fnmatch(rel, "runs/*/metrics.jsonl"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(x) for x in f if x.strip()]
        return [("step", rel, r["step"]) for r in rows if "loss" in r]
    if fnmatch.fnmatch(rel, "reports/*/metrics.json"):
        with open(path, encoding="utf-8") as f:
            return [("recall", rel, lang) for lang in json.load(f).get("langs", {})]
    return []


def fingerprint(root: str) -> tuple[dict, collections.Counter]:
    """(relative path -> digest, the items' counts) of a data root."""
    files, counts = {}, collections.Counter()
    for rel in compared_files(root):
        files[rel] = digest(os.path.join(root, rel), rel)
        counts.update(items(root, rel))
    return files, counts


def differences(ref: dict, got: dict) -> list[str]:
    """What differs between two fingerprints, one phrase each."""
    out = [f"missing {rel}" for rel in sorted(set(ref) - set(got))]
    out += [f"extra {rel}" for rel in sorted(set(got) - set(ref))]
    for rel in sorted(set(ref) & set(got)):
        a, b = ref[rel], got[rel]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"{rel} ({len(keys)} of {len(a)} entries differ: {', '.join(keys[:4])})")
        else:
            out.append(f"{rel} differs")
    return out


def lost_and_duplicated(ref: collections.Counter, got: collections.Counter) -> tuple[int, int]:
    """(items of ``ref`` that ``got`` lacks, copies ``got`` holds beyond ``ref``'s -- beyond one for a new item)."""
    return (sum(1 for item in ref if item not in got),
            sum(max(0, n - max(ref.get(item, 0), 1)) for item, n in got.items()))


# ---------------------------------------------------------------------- one trial


def kill_during(config: str, root: str, stage: str, delay: float, env: dict, log) -> str:
    """Start the chain on ``root``; ``delay`` s after it announces ``stage``, stop its group and SIGKILL it.
    Returns "killed"; "missed" when it reached its next stage or its end first; else why it failed."""
    run = Run(config, root, env, log)
    while (found := next_event(run)) != stage:
        if found is None:
            return _ended(run, f"before announcing {stage}")
    deadline = time.monotonic() + delay
    while (left := deadline - time.monotonic()) > 0:
        line = run.line(left)
        if line is not None and event(line):
            run.kill()
            return "missed"
        if line is None and run.eof:
            return _ended(run, "before the kill")
    run.signal(signal.SIGSTOP)  # nothing more is written; what it wrote before is in the pipe
    while (line := run.line(0.2)) is not None:
        if event(line):
            run.kill()
            return "missed"
    if run.eof:
        return _ended(run, "before the kill")
    run.kill()
    return "killed"


def _ended(run: Run, when: str) -> str:
    """A run that ended by itself: "missed" when it succeeded, else why it failed."""
    code = run.proc.wait()
    run.close()
    return "missed" if code == 0 else f"the run failed (exit {code}) {when}"


def resume(config: str, root: str, stage: str, last: bool, env: dict, log) -> str | None:
    """Run the chain on the killed ``root`` to the end of ``stage``: until it announces the next
    stage (then it is killed), or for the ``last`` stage to its end. None, or why it failed."""
    run = Run(config, root, env, log)
    seen = False
    while (found := next_event(run)) is not None:
        seen = seen or found == stage
        if seen and found != stage and not last:
            run.signal(signal.SIGSTOP)
            run.kill()
            return None
    code = run.proc.wait()
    run.close()
    if code != 0:
        return f"the resume failed (exit {code})"
    return None if seen else f"the resume never announced {stage}"


def resume_note(root: str, stage: str) -> str:
    """What the resume found done (from the summaries; the comparison leaves these keys out): how
    many images its acquisition fetched again, which checkpoint its pre-training continued from."""
    notes, images, attempted = [], 0, 0
    for rel in compared_files(root):
        if stage == "acquire" and fnmatch.fnmatch(rel, "sources/*/summary.json"):
            summary = _read_json(os.path.join(root, rel))
            images, attempted = images + summary.get("images", 0), attempted + summary.get("rows_attempted", 0)
        elif stage == "pretrain" and fnmatch.fnmatch(rel, "runs/*/summary.json"):
            resumed = _read_json(os.path.join(root, rel)).get("resumed_from")
            notes.append(f"continued from {os.path.basename(resumed)}" if resumed else "trained from step 0")
    if images:
        notes.append(f"fetched {attempted} of {images} images")
    return ", ".join(notes)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------- the benchmark


def prefect_server(env: dict):
    """A Prefect API server for every run (None where PREFECT_API_URL names one already)."""
    if env.get("PREFECT_API_URL"):
        return None
    from ccrk.app.prefect_api import LocalAPIServer

    server = LocalAPIServer()
    server.start()  # with os.environ, PREFECT_HOME among it
    why = server.wait_ready(300)
    if why:
        raise SystemExit(f"the Prefect API server did not start: {why}")
    env["PREFECT_API_URL"] = server.api_url
    return server


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo-kill.yaml")
    ap.add_argument("--kills", type=int, default=20, help="kills per stage")
    ap.add_argument("--stages", default=None, help="comma-separated stages to kill (default: every stage but the "
                                                   "demo corpus's)")
    ap.add_argument("--max-tries", type=int, default=None, help="tries per stage (default: 3 x kills + 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the roots and the log go (default: a temp dir)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="kill-resume-"))
    root, states = os.path.join(work, "root"), os.path.join(work, "states")
    os.makedirs(work, exist_ok=True)
    log = open(os.path.join(work, "log.txt"), "a", buffering=1, encoding="utf-8")
    os.environ.setdefault("PREFECT_HOME", os.path.join(work, "prefect"))  # the server's database, the runs'
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    print(f"work dir {work}", flush=True)
    t_start = time.perf_counter()
    server = prefect_server(env)
    try:
        return benchmark(args, rng, root, states, env, log, t_start)
    finally:
        if server is not None:
            server.stop()


def benchmark(args, rng: random.Random, root: str, states: str, env: dict, log, t_start: float) -> int:
    marks = uninterrupted(args.config, root, states, env, log)
    order = [stage for stage, _, _ in marks[:-1]]
    windows = {stage: (at, marks[i + 1][1], path, marks[i + 1][2])
               for i, (stage, at, path) in enumerate(marks[:-1])}
    print("uninterrupted run, stage windows (s): " + ", ".join(f"{s} {a:.1f}-{b:.1f}" for s, (a, b, _, _)
                                                                in windows.items()), flush=True)
    wanted = args.stages.split(",") if args.stages else [s for s in order if s != "demo"]
    unknown = [s for s in wanted if s not in windows]
    if unknown:
        raise SystemExit(f"stages not in this config's chain: {', '.join(unknown)} (it has {', '.join(order)})")
    tally = collections.Counter()
    per_stage = {stage: kill_series(args, rng, stage, windows[stage], stage == order[-1], root, env, log, tally)
                 for stage in wanted}
    identical = tally["problems"] == 0
    print(f"stages covered: {', '.join(per_stage)}; wall time {time.perf_counter() - t_start:.0f} s", flush=True)
    print(f"kills={sum(per_stage.values())} per_stage={','.join(str(n) for n in per_stage.values())} "
          f"identical={identical} lost={tally['lost']} duplicated={tally['duplicated']}", flush=True)
    complete = all(n == args.kills for n in per_stage.values())
    return 0 if identical and complete and not tally["lost"] and not tally["duplicated"] else 1


def kill_series(args, rng: random.Random, stage: str, window: tuple, last: bool, root: str, env: dict, log,
                tally: collections.Counter) -> int:
    """``args.kills`` trials of ``stage`` (``window``: its start and end in the uninterrupted run, the
    states at its start and end); returns the kills made, adds problems, lost and duplicated to ``tally``."""
    start, end, start_state, end_state = window
    ref_files, ref_items = fingerprint(end_state)
    kills = tries = 0
    t0 = time.perf_counter()
    while kills < args.kills and tries < (args.max_tries or 3 * args.kills + 3):
        tries += 1
        delay = rng.uniform(0, end - start)
        copy_root(start_state, root)
        outcome = kill_during(args.config, root, stage, delay, env, log)
        if outcome == "missed":
            print(f"{stage} try {tries}: reached its end before the kill at {delay:.1f} s; re-drawn", flush=True)
            continue
        if outcome != "killed":
            tally["problems"] += 1
            print(f"{stage} try {tries}: FAILED: {outcome}; see the log", flush=True)
            continue
        kills += 1
        failed = resume(args.config, root, stage, last, env, log)
        note = resume_note(root, stage)
        files, counts = fingerprint(root)
        diff = [failed] if failed else differences(ref_files, files)
        lost, duplicated = lost_and_duplicated(ref_items, counts)
        tally.update(problems=bool(diff), lost=lost, duplicated=duplicated)
        verdict = "identical" if not diff else "DIFFERENT: " + "; ".join(diff[:6])
        print(f"{stage} kill {kills}/{args.kills}: at {delay:.1f} s of {end - start:.1f} s, resumed"
              + (f" ({note})" if note else "") + f": {verdict}"
              + (f", lost {lost}, duplicated {duplicated}" if lost or duplicated else ""), flush=True)
    print(f"{stage}: {kills} kills in {tries} tries, {time.perf_counter() - t0:.0f} s", flush=True)
    return kills


if __name__ == "__main__":
    sys.exit(main())
