"""`ccrk pretrain --dataset DIR --config configs/X.yaml [--out RUN_DIR] [--resume]`: CCRk pre-training.

Multi-GPU / multi-node: ``torchrun --nproc_per_node G [--nnodes ...] -m ccrk.cli pretrain ...``
(rank 0 runs the Prefect flow, the other ranks the same training loop directly).
"""
from __future__ import annotations


def add_parser(sub) -> None:
    from ccrk.cli import add_root_argument

    p = sub.add_parser("pretrain", help="pre-train the CCRk model on a K-lingual dataset")
    add_root_argument(p)
    p.add_argument("--dataset", required=True, help="dataset version directory (datasets/<name>/<version>)")
    p.add_argument("--config", required=True, help="run config YAML (configs/tiny.yaml, ccr6.yaml, ...)")
    p.add_argument("--out", default=None, help="run directory (default <root>/runs/<run id>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's latest checkpoint (also automatic when one exists)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import os

    from ccrk.console import console, print_mapping
    from ccrk.model import latest_checkpoint
    from ccrk.trainer import dataset_version, load_config, run_id, train
    from storage import layout
    from storage.errors import CCRKError

    root = layout.data_root(args.root)
    if not os.path.isdir(args.dataset):
        raise CCRKError(f"dataset directory {args.dataset} does not exist")
    config = load_config(args.config)
    if args.seed is not None:
        config["seed"] = args.seed
    version = run_id(config, dataset_version(args.dataset, root)[0])
    run_dir = os.path.abspath(args.out) if args.out else layout.run_dir(root, version)
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("run_id") == version and done.get("steps") == done.get("total_steps"):
            console.print(f"run {version} is already trained: {run_dir} (loss curve {done.get('loss_curve')})")
            return 0
    resume = args.resume or latest_checkpoint(run_dir) is not None
    if int(os.environ.get("RANK", "0")) != 0:
        train(config, args.dataset, run_dir, resume=resume, root=root)
        return 0
    from flows.pretrain import pretrain_flow

    if resume and latest_checkpoint(run_dir):
        console.print(f"resuming from {latest_checkpoint(run_dir)}")
    summary = pretrain_flow(config, os.path.abspath(args.dataset), run_dir, resume=resume, root=root)
    print_mapping(f"pretrain {summary['run_id']}", {k: v for k, v in summary.items() if v is not None})
    console.print(f"loss curve: {summary['loss_curve']}")
    return 0
