"""`ccrk reproduce --config configs/demo.yaml`: the whole chain, every stage skipped when done."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument

    p = sub.add_parser("reproduce", help="run the whole chain (acquire -> translate -> build -> pretrain -> evaluate)")
    add_root_argument(p)
    p.add_argument("--config", default="configs/demo.yaml", help="reproduction config (configs/demo.yaml, ccr10-e.yaml)")
    p.set_defaults(func=run, runs_flows=True)


def run(args) -> int:
    from flows.reproduce import reproduce_flow

    reproduce_flow(config=args.config, root=args.root)
    return 0
