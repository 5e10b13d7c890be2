"""`ccrk pretrain --dataset DIR --config configs/X.yaml [--out RUN_DIR] [--resume]`: CCRk pre-training.

Multi-GPU / multi-node: ``torchrun --nproc_per_node G [--nnodes ...] -m ccrk.app.cli pretrain ...``
(every rank goes through the same flow: rank 0 runs it under Prefect, the others call its function,
``pretrain_flow.fn``; only rank 0 records the run and publishes).
"""
from __future__ import annotations


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument

    p = sub.add_parser("pretrain", help="pre-train the CCRk model on a K-lingual dataset")
    add_root_argument(p)
    p.add_argument("--dataset", required=True, help="dataset version directory (datasets/<name>/<version>)")
    p.add_argument("--config", required=True, help="run config YAML (configs/tiny.yaml, ccr6.yaml, ...)")
    p.add_argument("--out", default=None, help="run directory (default <root>/runs/<run id>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's latest checkpoint (also automatic when one exists)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.set_defaults(func=run, runs_flows=True)


def run(args) -> int:
    import os

    from ccrk.app.console import console, print_mapping, training_progress
    from ccrk.trainer import load_config
    from flows.pretrain import pretrain_flow
    from storage import layout
    from storage.errors import CCRKError

    root = layout.data_root(args.root)
    if not os.path.isdir(args.dataset):
        raise CCRKError(f"dataset directory {args.dataset} does not exist")
    config = load_config(args.config)
    if args.seed is not None:
        config["seed"] = args.seed
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 runs the flow, the others its function
        pretrain_flow.fn(config, args.dataset, run_dir=args.out, resume=args.resume, root=root)
        return 0
    with training_progress("pretrain") as progress:
        summary = pretrain_flow(config, args.dataset, run_dir=args.out, resume=args.resume, root=root,
                                progress=progress)
    if summary.get("skipped"):
        console.print(f"run {summary['run_id']} is already trained: {summary['run_dir']} "
                      f"(loss curve {summary.get('loss_curve')})")
        return 0
    print_mapping(f"pretrain {summary['run_id']}", {k: v for k, v in summary.items() if v is not None})
    console.print(f"loss curve: {summary['loss_curve']}")
    return 0
