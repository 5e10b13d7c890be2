"""`ccrk finetune`: zero-shot / few-shot / single-language retrieval fine-tuning, then evaluation (Prefect flow).

Multi-GPU: ``torchrun --nproc_per_node G -m ccrk.app.cli finetune ...`` (rank 0 runs the flow and the
evaluation, the other ranks the same fine-tune stage directly; only rank 0 records it).
"""
from __future__ import annotations

# FinetuneSpec's fields this verb takes as flags besides the benchmark's (the spec holds their
# defaults and help; --no-evaluate: fine-tune only).
FLAGS = ("mode", "lang", "shots", "preset", "epochs", "batch_size", "lr", "weight_decay", "warmup", "max_tokens",
         "image_size", "window_size", "select", "start_eval", "eval_interval", "seed", "num_workers", "evaluate")


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument
    from ccrk.app.commands.evaluate import BENCHMARK_FLAGS, add_benchmark_arguments
    from ccrk.specs import FinetuneSpec

    p = sub.add_parser("finetune", help="fine-tune a checkpoint for retrieval (ITC with image-id positives + ITM)")
    add_root_argument(p)
    add_benchmark_arguments(p, FinetuneSpec, BENCHMARK_FLAGS + FLAGS)
    p.set_defaults(func=run, runs_flows=True)


def run(args) -> int:
    import os

    from ccrk.app.commands.evaluate import BENCHMARK_FLAGS, print_report, spec_from_arguments
    from ccrk.app.console import print_mapping, training_progress
    from ccrk.evaluation.protocols import run_finetune
    from ccrk.specs import FinetuneSpec
    from flows.evaluate import finetune_args, finetune_flow

    spec = spec_from_arguments(FinetuneSpec, args, BENCHMARK_FLAGS + FLAGS, where="ccrk finetune")
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 runs the flow, the others the same stage
        run_finetune(**finetune_args(spec, args.root))
        return 0
    with training_progress("finetune") as progress:
        out = finetune_flow(spec, root=args.root, progress=progress)
    run_ = out["run"]
    print_mapping(f"fine-tuned run {run_['run_id']}", {k: run_.get(k) for k in
                                                       ("run_dir", "selected", "epochs", "pairs", "loss", "itc", "itm",
                                                        "skipped_images", "rejected_captions", "seconds")})
    if "report" in out:
        print_report(out["report"])
    return 0
