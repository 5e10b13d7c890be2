"""`ccrk finetune`: zero-shot / few-shot / single-language retrieval fine-tuning, then evaluation (Prefect flow).

Multi-GPU: ``torchrun --nproc_per_node G -m ccrk.app.cli finetune ...`` (rank 0 runs the flow and the
evaluation, the other ranks the same fine-tune directly).
"""
from __future__ import annotations


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument
    from ccrk.app.commands.evaluate import add_benchmark_arguments

    p = sub.add_parser("finetune", help="fine-tune a checkpoint for retrieval (ITC with image-id positives + ITM)")
    add_root_argument(p)
    add_benchmark_arguments(p)
    p.add_argument("--mode", default="zero-shot", choices=("zero-shot", "few-shot", "single"),
                   help="zero-shot: English training set, evaluate every language; few-shot: continue on "
                        "annotations/<lang>/train_<N>.jsonl; single: one language's training set")
    p.add_argument("--lang", default=None, help="target language (few-shot, single)")
    p.add_argument("--shots", type=int, default=None, help="N of the few-shot file train_<N>.jsonl")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (the reference's)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32")
    p.add_argument("--lr", type=float, default=None, help="default 3e-5 (few-shot 1e-5)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=0, help="processes building the training batches")
    p.add_argument("--no-evaluate", action="store_true", help="fine-tune only")
    p.set_defaults(func=run, runs_flows=True)


def run(args) -> int:
    import os

    from ccrk.app.commands.evaluate import device_of, print_report
    from ccrk.app.console import print_mapping, training_progress
    from ccrk.evaluation.protocols import run_finetune
    from flows.evaluate import finetune_flow
    from storage.languages import parse_langs

    run_args = dict(root=args.root, checkpoint=args.checkpoint, benchmark=args.benchmark, data_dir=args.data,
                    mode=args.mode, lang=args.lang, shots=args.shots, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed, images=args.images, coco_images=args.coco_images,
                    skip_missing=args.skip_missing, device=device_of(args), num_workers=args.num_workers)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 runs the flow, the others fine-tune directly
        run_finetune(**run_args)
        return 0
    with training_progress("finetune") as progress:
        out = finetune_flow(**run_args, evaluate=not args.no_evaluate,
                            langs=list(parse_langs(args.langs)) if args.langs else None,
                            mrv_langs=list(parse_langs(args.mrv_langs)) if args.mrv_langs else None,
                            k_test=args.k_test, itc_only=args.itc_only, progress=progress)
    run_ = out["run"]
    print_mapping(f"fine-tuned run {run_['run_id']}", {k: run_.get(k) for k in
                                                       ("run_dir", "checkpoint", "epochs", "pairs", "loss", "itc", "itm",
                                                        "skipped_images", "rejected_captions", "seconds")})
    if "report" in out:
        print_report(out["report"])
    return 0
