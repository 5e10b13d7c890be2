"""A temporary Prefect API for one ``ccrk`` command, started before anything heavy is imported.

Without an API URL, Prefect starts a temporary server itself the first time a flow needs one. Its
client imports the whole server application first (about 4.5 s here) and only then starts the
server in a subprocess, which imports it again (5-8 s); the command waits for both, one after the
other. Here the server subprocess is started as the command begins, with the same command and
settings Prefect uses for its temporary server, so that it comes up while the command imports
Prefect, torch and its stage. The command's own process never imports the server application.

Nothing changes where an API is configured (``PREFECT_API_URL`` in the environment or the active
profile, or a test harness's settings): that server is used. Should the early server fail to come
up, Prefect's own temporary server is used instead, after a warning.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from storage.switches import switched_off

STARTUP_FAILED = 3  # uvicorn's exit status when it cannot start (a taken port among the causes)


def _die_with_parent() -> None:
    """In the server's process, before it runs: ask Linux to stop it (SIGTERM) when the command's
    process ends, however it ends (a SIGKILL runs no atexit hook)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalAPIServer:
    """A Prefect API server in a subprocess on a free loopback port (:meth:`start` returns at once)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        self.port = _free_port()
        if self.log is None:
            self.log = tempfile.TemporaryFile()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0",
               # What Prefect's own temporary server sets (prefect.server.api.server.SubprocessASGIServer).
               "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def wait_ready(self, timeout: float) -> str | None:
        """Until the API answers its health check; None then, else why not (and the server is stopped)."""
        deadline, retries = time.monotonic() + timeout, 3
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code == STARTUP_FAILED and retries and "address already in use" in self._log_tail().lower():
                retries -= 1  # the port was taken meanwhile: another one
                self.start()
                continue
            if code is not None:
                why = f"it exited with status {code}: {self._log_tail()}"
                self.stop()
                return why
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return None
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        return f"no answer on {self.api_url} within {timeout:.0f} s"

    def _log_tail(self) -> str:
        """The server's last words on stderr (its last two lines)."""
        if self.log is None:
            return "no output"
        self.log.seek(0)
        lines = [x.strip() for x in self.log.read().decode("utf-8", "replace").splitlines() if x.strip()]
        return " / ".join(lines[-2:])[-400:] or "no output"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


def early_server() -> LocalAPIServer | None:
    """Start the server now when this command will need one: no API URL in the environment, and
    Prefect not yet imported (in-process callers such as tests have their own settings)."""
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    if switched_off("PREFECT_SERVER_EPHEMERAL_ENABLED"):
        return None  # no temporary server wanted
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return None  # a torchrun worker other than rank 0: it runs no flow (ccrk pretrain)
    if switched_off("CCRK_PREFECT_EARLY_SERVER"):
        return None
    server = LocalAPIServer()
    try:
        server.start()
    except OSError:
        return None
    # Stopped at exit, as Prefect stops its own: after Prefect's log and event workers have sent
    # what they hold (they drain at thread shutdown, which comes before atexit).
    atexit.register(server.stop)
    return server


@contextmanager
def use_server(server: LocalAPIServer | None):
    """Point Prefect at ``server`` for the block, once it answers (unless an API is configured:
    then that one). The server runs till the process exits."""
    if server is None:
        yield
        return
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, PREFECT_UI_URL, temporary_settings)

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():  # as the active profile says
        server.stop()
        yield
        return
    problem = server.wait_ready(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    if problem:  # wait_ready has stopped it
        print(f"ccrk: the early Prefect API server did not start ({problem}); "
              "Prefect starts its own temporary server instead", file=sys.stderr)
        yield
        return
    # No UI is served (as with Prefect's temporary server): no "View at" links to it.
    with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_UI_URL: ""}):
        yield
