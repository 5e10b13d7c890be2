"""The stage contract (storage.stage.run_stage): the one writer of the catalog."""
from __future__ import annotations

from storage.catalog import Catalog
from storage.stage import Outcome, StagePlan, run_stage


class Toy:
    """A stage whose work is a file; ``finish`` says whether a run gets all of it done."""

    def __init__(self, root, finish=True):
        self.root, self.finish, self.runs, self.published = root, finish, 0, []

    def plan(self):
        return StagePlan("toy", "toy", "toyv1", str(self.root / "toy"), params={"n": 1}, parents=[])

    def completed(self, plan):
        done = self.root / "toy" / "DONE"
        return Outcome({"n": 1}, {"files": 1}) if done.exists() else None

    def execute(self, plan):
        self.runs += 1
        (self.root / "toy").mkdir(exist_ok=True)
        if self.finish:
            (self.root / "toy" / "DONE").write_text("ok")
        return Outcome({"n": 1}, {"files": 1}, complete=self.finish)

    def publish(self, plan, summary):
        self.published.append(summary["skipped"])


def test_run_stage_records_complete_work_once_and_skips_it_after(tmp_path):
    root = str(tmp_path)
    short = Toy(tmp_path, finish=False)
    assert run_stage(short, root)["skipped"] is False
    assert Catalog(root).get("toyv1") is None  # stopped short: published, not recorded
    assert short.published == [False]
    stage = Toy(tmp_path)
    assert run_stage(stage, root)["skipped"] is False
    art = Catalog(root).get("toyv1")
    assert (art.kind, art.params, art.stats) == ("toy", {"n": 1}, {"files": 1})
    again = Toy(tmp_path)
    assert run_stage(again, root)["skipped"] is True and again.runs == 0


def test_a_complete_artifact_without_its_entry_gets_one(tmp_path):
    """A kill between the stage's last write and its catalog entry: the next run records it."""
    root = str(tmp_path)
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "DONE").write_text("ok")
    stage = Toy(tmp_path)
    assert run_stage(stage, root)["skipped"] is True and stage.runs == 0
    assert Catalog(root).get("toyv1").stats == {"files": 1}


def test_only_rank_zero_records(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    stage = Toy(tmp_path)
    assert run_stage(stage, str(tmp_path))["skipped"] is False and stage.published == []
    monkeypatch.setenv("RANK", "0")
    assert Catalog(str(tmp_path)).get("toyv1") is None
