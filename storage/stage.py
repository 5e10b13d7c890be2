"""The one stage contract: spec -> version -> skip if complete -> run -> record in the catalog with
its parents -> publish. Every stage (acquire, translate, build, pretrain, finetune, evaluate, checkpoint
import) is a :class:`Stage`, and :func:`run_stage` is the only code that writes the catalog.

A stage's parts, in the order :func:`run_stage` calls them:

- ``plan()`` -> :class:`StagePlan`: the artifact's identity (kind, name, version, path, the params
  it was derived from, its parents), from the stage's spec and inputs; nothing heavy is written.
- ``completed(plan)`` -> :class:`Outcome` or None: the finished artifact's summary and stats when
  it is already complete (a second run, or a run killed after its last write), else None.
- ``execute(plan)`` -> :class:`Outcome`: do the work (resumable: a killed run picks up its parts).
- ``publish(plan, summary)``: Prefect artifacts (a no-op outside a flow run).

The artifact is produced under its lock (:func:`storage.locks.artifact_lock`, taken after ``plan()``,
held through the catalog entry): a second run of the same artifact waits for the first, naming its
pid, then finds it complete -- ``completed()`` looks at the artifact on disk, not at what
``plan()`` saw -- or resumes what is left; with ``--no-wait`` it stops with one line.

The catalog entry is written after complete work and whenever a completed artifact has none (a kill
between the stage's last write and its catalog entry loses nothing); an outcome that stopped short
(``complete=False``) is returned and published but not recorded, until a rerun finishes it. Under torchrun only rank 0
records and publishes; every rank goes through the same entry.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

from storage import layout
from storage.catalog import Artifact, Catalog
from storage.locks import artifact_lock


@dataclass
class StagePlan:
    kind: str
    name: str
    version: str
    path: str
    params: dict = field(default_factory=dict)
    parents: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    summary: dict            # what the stage returns to its caller
    stats: dict = field(default_factory=dict)  # what the catalog keeps beside the params
    complete: bool = True    # False: the work stopped short (e.g. shards left to a rerun): not recorded


class Stage(Protocol):
    def plan(self) -> StagePlan: ...

    def completed(self, plan: StagePlan) -> Outcome | None: ...

    def execute(self, plan: StagePlan) -> Outcome: ...

    def publish(self, plan: StagePlan, summary: dict) -> None: ...


def is_rank_zero() -> bool:
    """True outside torchrun, and on its rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def run_stage(stage: Stage, root: str | None, engine=None) -> dict:
    """Run ``stage`` through the contract; returns its summary with ``skipped`` (True: it was
    complete already). ``engine``: a DuckDB connection the stage already holds on the catalog."""
    plan = stage.plan()
    with _producing(plan, root):
        done = stage.completed(plan)
        outcome = done if done is not None else stage.execute(plan)
        summary = {**outcome.summary, "skipped": done is not None}
        if is_rank_zero():
            catalog = Catalog(root, engine)
            if outcome.complete and (done is None or catalog.get(plan.version) is None):
                catalog.record(Artifact(version=plan.version, kind=plan.kind, name=plan.name, path=plan.path,
                                        params=plan.params, stats=outcome.stats, parents=plan.parents))
    if is_rank_zero():
        stage.publish(plan, summary)
    return summary


def _producing(plan: StagePlan, root: str | None):
    """The artifact's lock. Under torchrun rank 0 alone takes it: the other ranks are the same run
    (waiting for the lock their rank 0 holds, they would never get it)."""
    if not is_rank_zero():
        return nullcontext()
    return artifact_lock(layout.data_root(root), plan.path, f"{plan.kind} {plan.name} {plan.version}")
