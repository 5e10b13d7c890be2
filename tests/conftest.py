"""Shared fixtures: one Prefect test server per session, a data root per test."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A Prefect home of its own per test session: concurrent sessions never share a sqlite file.
# It is removed when the session ends: a suite run leaves nothing behind in the temp dir.
if "PREFECT_HOME" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="ccrk-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """Flows really run, against one local Prefect server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    from ccrk.app.cli import local_flow_runs

    with prefect_test_harness(server_startup_timeout=120), local_flow_runs():  # as `ccrk` runs flows
        yield


@pytest.fixture
def root(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    monkeypatch.setenv("CCRK_ROOT", str(d))
    return str(d)
