"""prefect.yaml really deploys: a real Prefect server on loopback, a process work pool, a worker,
and the `coco` acquisition deployment run to completion against the demo corpus."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFECT = os.path.join(os.path.dirname(sys.executable), "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               CCRK_REPO=REPO, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("prefect server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
        yield env
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def _prefect(env, *args, timeout=300) -> str:
    out = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _flow_runs(env) -> list[dict]:
    req = urllib.request.Request(env["PREFECT_API_URL"] + "/flow_runs/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def test_coco_deployment_runs_to_completion(prefect_server, tmp_path):
    from storage.demo.corpus import generate_demo_corpus, write_demo_metadata
    from storage.demo.server import serve

    env = prefect_server
    corpus = str(tmp_path / "corpus")
    generate_demo_corpus(corpus, n_train=16, n_heldout=4)
    root = str(tmp_path / "data")
    _prefect(env, "work-pool", "create", "ccrk-process", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--name", "coco")
    with serve(corpus) as server:
        metadata = write_demo_metadata(corpus, server.url)["coco"]
        spec = {"source": "coco", "metadata": metadata, "image_size": 32,  # the deployment's, with three changes
                "allow_addresses": [server.address]}
        params = ["--param", f"root={root}", "--param", "spec=" + json.dumps(spec)]
        _prefect(env, "deployment", "run", "acquire/coco", *params)
        _prefect(env, "worker", "start", "--pool", "ccrk-process", "--run-once", timeout=400)

    runs = _flow_runs(env)
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"]
    summary = json.load(open(next(
        os.path.join(dp, "summary.json") for dp, _, files in os.walk(os.path.join(root, "sources", "coco"))
        if "summary.json" in files)))
    assert summary["images_ok"] == 4  # the coco quarter of 16 train images
