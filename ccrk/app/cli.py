"""The ``ccrk`` command line: one verb per pipeline stage, each running its stage as a Prefect flow.

Verbs live in :mod:`ccrk.app.commands` (one module each, discovered here). A :class:`CCRKError`, a
missing file or a full disk becomes one clear sentence on stderr and exit status 2 -- never a
traceback, neither ours nor the Prefect run log's (``--debug`` shows them). ``--no-wait`` (before or
after the verb; :data:`storage.locks.NO_WAIT_ENV` for the processes it starts) makes a run that finds
its artifact being produced by another stop with one line instead of waiting.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from contextlib import contextmanager, nullcontext

from storage.atomic import is_disk_full
from storage.errors import CCRKError
from storage.locks import NO_WAIT_ENV

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect's ephemeral server can take long to start on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# No telemetry from the local server (and no failed lookups on offline hosts).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

NO_WAIT_HELP = ("when another run is producing the same artifact, stop (exit 2) instead of waiting for it "
                f"(also ${NO_WAIT_ENV}=1)")


def build_parser() -> argparse.ArgumentParser:
    import ccrk.app.commands as commands

    parser = argparse.ArgumentParser(prog="ccrk", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--no-wait", action="store_true", help=NO_WAIT_HELP)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"ccrk.app.commands.{info.name}")
        module.add_parser(sub)
    for verb in sub.choices.values():  # after the verb too; SUPPRESS keeps a --no-wait given before it
        verb.add_argument("--no-wait", action="store_true", default=argparse.SUPPRESS, help=NO_WAIT_HELP)
    return parser


def add_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=None,
                        help="data root (fsspec path; default $CCRK_ROOT or ./data)")


@contextmanager
def local_flow_runs():
    """Flows run from the command line without flow-run heartbeats, unless
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY (or its legacy name) is set.

    Heartbeats let a server mark a deployment's crashed run; a run started here is watched by the
    caller. Prefect 3.8's heartbeat thread sleeps in 1-second steps and every flow waits for it on
    exit, which added up to 1 s to each stage (an empty flow took 1.09 s). Deployment runs do not
    come through here and keep their heartbeats."""
    if {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"} & set(os.environ):
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    runs_flows = getattr(args, "runs_flows", False)
    if runs_flows and not args.debug:
        _brief_run_errors()
    from ccrk.app.prefect_api import early_server, use_server

    server = early_server() if runs_flows else None  # comes up while the command imports its stage
    try:
        with use_server(server), local_flow_runs() if runs_flows else nullcontext(), _no_wait(args.no_wait):
            try:
                code = args.func(args)
            finally:
                if runs_flows:
                    _settle_prefect()
        return int(code or 0)
    except KeyboardInterrupt:
        print(f"ccrk {args.verb}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        line = error_line(exc)
        if line is None or args.debug:
            raise
        _release(exc)
        prefix = f"ccrk {args.verb}: "
        line = line[len(prefix):] if line.startswith(prefix) else line  # a spec's error names the verb too
        print(f"{prefix}error: {line}", file=sys.stderr)
        return 2


def error_line(exc: BaseException) -> str | None:
    """The one sentence an error the user can act on is reported as: a :class:`CCRKError`, a missing
    file, the disk full (where the error names the file being written, that file). None for any
    other error: a bug, whose traceback is shown."""
    if isinstance(exc, CCRKError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename or exc}"
    if is_disk_full(exc):
        filename = getattr(exc, "filename", None)
        where = f" writing {filename}" if filename else f" ({(str(exc).splitlines() or [''])[0][:300]})"
        return f"no space left on device{where}: free some space, then run the same command again to resume"
    return None


@contextmanager
def _no_wait(given: bool):
    """``--no-wait`` as its environment variable while the command runs (its flows, the processes it starts)."""
    if not given:
        yield
        return
    before = os.environ.get(NO_WAIT_ENV)
    os.environ[NO_WAIT_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NO_WAIT_ENV, None)
        else:
            os.environ[NO_WAIT_ENV] = before


class _BriefRunErrors(logging.Filter):
    """Drops the traceback of a log record whose exception :func:`error_line` reports as one
    sentence; keeps the line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and error_line(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def _brief_run_errors() -> None:
    """Prefect logs a failed task or flow run with its traceback. For the errors this command
    reports as one sentence (bad input, a missing file, a full disk) the log keeps its one line and
    drops the traceback; any other exception keeps it. ``--debug`` keeps them all. Installed once
    per process, however often :func:`main` runs."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BriefRunErrors) for f in logger.filters):
            logger.addFilter(_BriefRunErrors())


def _settle_prefect(timeout: float = 10.0) -> None:
    """Send the events and run logs Prefect still queues while its API server is up. Left to the
    interpreter's exit they drain after the command's last line, sometimes with a "Still
    processing items" warning after the one-line error."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        service.drain_all(timeout=timeout, at_exit=False)


def _release(exc: BaseException) -> None:
    """Drop what the failed stage's frames still hold (DuckDB connections among them): the
    exception outlives the command in Prefect's run states, and DuckDB's bindings list every object
    still alive at exit as a leak -- dozens of lines after the one-line error."""
    import gc
    import traceback

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()


if __name__ == "__main__":
    sys.exit(main())
