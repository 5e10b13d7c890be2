"""`ccrk` starts its own temporary Prefect API as the command begins, so that it comes up while
the command imports its stage (ccrk/app/prefect_api.py)."""
import glob
import os
import signal
import subprocess
import sys
import time

from klingual_fixtures import tiny_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _servers_of(prefect_home: str) -> list[int]:
    """Pids of Prefect API servers running with this PREFECT_HOME."""
    out = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            cmd = open(f"{d}/cmdline", "rb").read()
            env = open(f"{d}/environ", "rb").read()
        except OSError:
            continue
        if b"prefect.server.api.server:create_app" in cmd and f"PREFECT_HOME={prefect_home}".encode() in env:
            out.append(int(os.path.basename(d)))
    return out


def _ccrk(args, prefect_home, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    # INFO: the run's log lines are checked (`make test` exports PREFECT_LOGGING_LEVEL=WARNING).
    full.update(PREFECT_HOME=prefect_home, PYTHONPATH=REPO, PREFECT_LOGGING_LEVEL="INFO", **env)
    return subprocess.run([sys.executable, "-m", "ccrk.app.cli", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=600)


def test_a_command_runs_its_flow_on_the_early_server_and_stops_it(tmp_path):
    root, home = str(tmp_path / "data"), str(tmp_path / "prefect")
    tiny_corpus(root)
    args = ["build", "--root", root, "--name", "tiny", "--sources", "coco,vg", "--langs", "en,es,ru", "--shard-size", "2"]
    out = _ccrk(args, home)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "built dataset tiny" in out.stdout
    logs = out.stdout + out.stderr
    assert "Starting temporary server" not in logs  # Prefect did not need one of its own
    assert "Error logging to API" not in logs       # logs reached the server before it stopped
    assert "View at" not in logs                    # no links to a UI that is not served
    assert "Finished in state Completed" in logs
    assert _servers_of(home) == []
    # Switched off: Prefect starts its temporary server itself, as before.
    out = _ccrk(args, home, CCRK_PREFECT_EARLY_SERVER="0")
    assert out.returncode == 0 and "Starting temporary server" in out.stdout + out.stderr
    assert "already built" in out.stdout


def test_the_server_stops_when_the_command_is_killed(tmp_path):
    """A SIGKILL runs no exit hook; Linux stops the server with its parent (PR_SET_PDEATHSIG)."""
    home = str(tmp_path / "prefect")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=home, PYTHONPATH=REPO)
    code = ("import sys, time; from ccrk.app.prefect_api import early_server; s = early_server(); "
            "print(s.port, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert int(proc.stdout.readline())
        deadline = time.time() + 30
        while not _servers_of(home) and time.time() < deadline:
            time.sleep(0.1)
        assert _servers_of(home)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 30
    while _servers_of(home) and time.time() < deadline:
        time.sleep(0.1)
    assert _servers_of(home) == []


def test_a_server_that_cannot_start_is_reported(tmp_path, monkeypatch):
    from ccrk.app.prefect_api import LocalAPIServer

    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/prefect.db")
    server = LocalAPIServer()
    server.start()
    problem = server.wait_ready(120)
    assert problem and "exited with status" in problem and "startup failed" in problem.lower()
    assert server.proc is None
