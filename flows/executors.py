"""Where a stage's work runs: ``local`` (this machine's processes and threads) or ``ray`` (a Ray cluster).

:func:`ray_cluster` connects to a running cluster (``address``: ``HOST:PORT`` of a ``ray start --head``
node, ``ray://HOST:10001`` for Ray Client, or ``auto``) or, without one, starts a private local
cluster on loopback for the duration of the stage and shuts it down after. A cluster already
initialised in this process (by a caller, or prefect-ray's task runner) is reused and left running.

Workers import the project by module name (img2dataset's downloader subclasses, the translation
part function): a local cluster's workers run this same interpreter, where the project is installed;
for a remote cluster the driver ships its own copy of the project packages (``py_modules``), so
every node runs the code version the driver hashes into artifact versions. Third-party packages
(img2dataset, ctranslate2, ...) must be installed on the nodes, and the data root must be a path
every node sees (a shared filesystem).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from storage.errors import CCRKError

EXECUTORS = ("local", "ray")
PROJECT_PACKAGES = ("ccrk", "storage", "translation", "flows")
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Set for every worker: img2dataset's imports otherwise check for updates and start wandb.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def check_executor(executor: str) -> str:
    if executor not in EXECUTORS:
        raise CCRKError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    return executor


def _project_packages() -> list[str]:
    """The project's package directories (paths, not module objects: a stale editable install can
    expose one as a namespace package, which Ray's ``py_modules`` refuses)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [os.path.join(repo, name) for name in PROJECT_PACKAGES]


def ray_init_kwargs(address: str | None = None, num_cpus: int | None = None,
                    num_gpus: int | None = None) -> dict:
    """Keyword arguments of ``ray.init``: a remote cluster at ``address``, else a local one on loopback."""
    runtime_env: dict = {"env_vars": dict(WORKER_ENV)}
    kwargs: dict = {"configure_logging": False, "log_to_driver": False, "runtime_env": runtime_env}
    if address:
        kwargs["address"] = address
        runtime_env["py_modules"] = _project_packages()
        runtime_env["excludes"] = ["__pycache__", "*.pyc"]
        return kwargs
    # Private local cluster: no dashboard, as many CPUs as asked (default: all). address="local": always
    # a new cluster, never one found through /tmp/ray/ray_current_cluster.
    kwargs.update(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=num_cpus,
                  num_gpus=num_gpus)
    return kwargs


@contextmanager
def _loopback_only() -> Iterator:
    """Keep a local cluster on 127.0.0.1: Ray swaps a loopback node ip for the host's address unless it
    believes multi-node clusters are off (read from the environment by the processes it starts)."""
    import ray._private.ray_constants as constants

    saved = constants.ENABLE_RAY_CLUSTER, os.environ.get(_CLUSTER_ENV)
    constants.ENABLE_RAY_CLUSTER = False
    os.environ[_CLUSTER_ENV] = "0"
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved[0]
        if saved[1] is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = saved[1]


@contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator:
    """Ray initialised for the block: reuse a running one, else connect to ``address`` or start locally."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(**ray_init_kwargs(address, num_cpus, num_gpus))
    else:
        with _loopback_only():
            ray.init(**ray_init_kwargs(address, num_cpus, num_gpus))
    try:
        yield ray
    finally:
        ray.shutdown()


def ray_task_runner(address: str | None = None, num_cpus: int | None = None):
    """prefect-ray's task runner on the cluster :func:`ray_cluster` would use. It reuses the cluster
    already initialised in this process (enter it inside ``ray_cluster``: a local one then stays on
    loopback), else initialises its own and shuts it down after."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from prefect_ray import RayTaskRunner

    kwargs = ray_init_kwargs(address, num_cpus)
    return RayTaskRunner(address=kwargs.pop("address", None), init_kwargs=kwargs)
