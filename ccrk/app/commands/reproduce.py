"""`ccrk reproduce --config configs/demo.yaml`: the whole chain, every stage skipped when done."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument

    p = sub.add_parser("reproduce", help="run the whole chain (acquire -> translate -> build -> pretrain -> evaluate)")
    add_root_argument(p)
    p.add_argument("--config", default="configs/demo.yaml", help="reproduction config (configs/demo.yaml, ccr10-e.yaml)")
    p.set_defaults(func=run, runs_flows=True)


def run(args) -> int:
    from ccrk.app.console import training_progress
    from flows.reproduce import reproduce_flow

    with training_progress("pretrain") as progress:
        reproduce_flow(config=args.config, root=args.root, report=print_stage, progress=progress)
    return 0


def print_stage(stage: str, summary: dict) -> None:
    """What the terminal shows of each stage of the chain as it finishes."""
    from ccrk.app.commands.acquire import print_summary
    from ccrk.app.commands.build import print_dataset_summary
    from ccrk.app.commands.translate import print_translation_summary
    from ccrk.app.console import console, print_table

    if stage == "stage":
        console.print(f"[bold]==> {summary['stage']}[/bold]")
    elif stage == "acquire":
        print_summary(summary)
    elif stage == "translate":
        print_translation_summary(summary)
    elif stage == "build":
        print_dataset_summary(summary)
    elif stage == "stages":
        print_table("reproduce: stages", ["stage", "seconds", "note"],
                    [(r["stage"], r["seconds"], r["note"]) for r in summary["rows"]])
    elif stage == "report":
        if summary["markdown"]:
            console.print(summary["markdown"], markup=False, soft_wrap=True)  # table rows stay whole in a log
        console.print(f"[bold]report:[/bold] {summary['path']}")
    else:  # verify, pretrain: their one line
        console.print(summary["_line"], markup=False, soft_wrap=True)
