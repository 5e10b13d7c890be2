"""Two CPU processes (gloo, DDP) give the loss and gradients of one process on the whole batch
(``loss.gather_grad: exact``), or those gradients over the world size through the gathered
features (``local``: the authors' AllGather)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from ccrk.trainer import load_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
WORLD = 2


def _setup(fusion: bool, gather_grad: str = "exact"):
    from ccrk.model import build_model
    from ccrk.objectives import build_objective

    config = load_config(CONFIG)
    config["loss"].update(fusion=fusion, gather_grad=gather_grad)
    torch.manual_seed(0)
    model, tok = build_model(config)
    g = torch.Generator().manual_seed(1)
    b, k, length = 8, 5, 9
    ids = torch.randint(4, len(tok) - 1, (b, k, length), generator=g)
    ids[..., 0], ids[..., -1] = 0, 2
    batch = {"pixel_values": torch.randn(b, 3, 64, 64, generator=g), "input_ids": ids,
             "attention_mask": torch.ones_like(ids),
             "text_valid": torch.rand(b, k, generator=g) > 0.3}
    batch["text_valid"][:, 0] = True
    return model, build_objective(model, config, tok), batch


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for mode in ("exact", "local"):
        model, objective, batch = _setup(fusion=False, gather_grad=mode)
        half = {k: v.chunk(world)[rank] for k, v in batch.items()}
        ddp = DDP(objective, find_unused_parameters=not objective.uses_all_parameters)  # fusion layers idle
        out = ddp(half, 0)
        out["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        save_file({"loss": out["loss"].detach().reshape(1), **grads},
                  os.path.join(out_dir, f"{mode}-rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both gather_grad modes run by two gloo processes: {mode: [rank 0's, rank 1's] loss and grads}."""
    import socket

    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(WORLD, port, str(out)), nprocs=WORLD, join=True)
    return {mode: [load_file(str(out / f"{mode}-rank{r}.safetensors")) for r in range(WORLD)]
            for mode in ("exact", "local")}


def test_two_process_ddp_matches_one_process(ranks):
    torch.set_num_threads(1)
    model, objective, batch = _setup(fusion=False)
    out = objective(batch, 0)
    out["loss"].backward()
    for got in ranks["exact"]:
        got = dict(got)
        assert got.pop("loss").item() == pytest.approx(out["loss"].item(), rel=1e-5)
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_local_gather_grad_is_exact_over_world_size(ranks):
    # Same loss; the contrastive gradient through the gathered features is 1/world of the exact one,
    # the temperature's (used by each rank directly, not gathered) is the same.
    for exact, local in zip(ranks["exact"], ranks["local"]):
        assert local["loss"].item() == pytest.approx(exact["loss"].item(), rel=1e-6)
        assert set(local) == set(exact)
        for name in exact:
            if name == "loss":
                continue
            expected = exact[name] if name == "temp" else exact[name] / WORLD
            assert torch.allclose(local[name], expected, rtol=1e-4, atol=1e-7), name
        assert exact["vision_proj.weight"].abs().max() > 0


def _pretrain_worker(rank: int, world: int, port: int, config: dict, dataset: str, run_dir: str, root: str,
                     out_dir: str) -> None:
    """One torchrun-like rank of ``ccrk pretrain``: every rank goes through the flow's function."""
    import json

    from ccrk import distributed
    from flows.pretrain import pretrain_flow

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    summary = pretrain_flow.fn(config, dataset, run_dir=run_dir, root=root)
    distributed.shutdown()
    with open(os.path.join(out_dir, f"summary-rank{rank}.json"), "w") as f:
        json.dump(summary, f)


def test_every_rank_runs_the_pretrain_flow_and_rank_zero_records_it(tmp_path):
    """torchrun's ranks > 0 call ``pretrain_flow.fn`` as rank 0 calls the flow: the tasks run as plain
    calls outside a flow run, the ranks train together, and only rank 0 writes the catalog."""
    import json
    import socket

    from kshards import make_klingual_dataset
    from storage.catalog import Catalog

    dataset = make_klingual_dataset(str(tmp_path / "dataset"), n_images=32, seed=3)
    config = load_config(CONFIG)
    config["device"] = "cpu"
    # Three steps: DDP without unused-parameter search needs every parameter to get a gradient every step.
    config["train"].update({"batch_size": 8, "steps": 3, "epochs": None, "log_every": 1, "eval_every": 1000,
                            "checkpoint_every": 1000, "heldout": 0, "threads": 1})
    root = str(tmp_path / "root")
    os.makedirs(root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_pretrain_worker, args=(WORLD, port, config, dataset, str(tmp_path / "run"), root, str(tmp_path)),
             nprocs=WORLD, join=True)
    summaries = [json.loads((tmp_path / f"summary-rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(not s["skipped"] and s["steps"] == 3 and s["world"] == WORLD for s in summaries)
    assert summaries[0]["run_id"] == summaries[1]["run_id"]
    runs = Catalog(root).list("run")
    assert len(runs) == 1 and runs[0].version == summaries[0]["run_id"] and runs[0].stats["world"] == WORLD
    assert runs[0].params["config"]["train"]["total_steps"] == 3
