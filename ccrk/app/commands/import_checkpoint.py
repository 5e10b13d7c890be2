"""`ccrk import-checkpoint SRC`: the authors' released (or any X-VLM-layout) checkpoint as a ccrk run."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ccrk.app.cli import add_root_argument

    p = sub.add_parser("import-checkpoint", help="import a reference CCRk / CCLM / X-VLM checkpoint as a ccrk run")
    add_root_argument(p)
    p.add_argument("src", help=".pth / .th ({'model': state_dict} or a bare state dict) or .safetensors")
    p.add_argument("--out", default=None, help="run directory (default <root>/runs/<run id>)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: pretrained/xlm-roberta-large for XLM-R's 250,002-token "
                        "vocabulary, else the demo tokenizer built to the checkpoint's vocabulary size)")
    p.add_argument("--text-heads", type=int, default=None,
                   help="attention heads of the text encoder, which shapes do not tell (default width / 64)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image resolution (default: read off the Swin's shifted-window masks, else 224)")
    p.add_argument("--name", default=None, help="run name (default imported-<file stem>)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ccrk.app.console import print_mapping
    from ccrk.reference import import_checkpoint

    out = import_checkpoint(args.src, root=args.root, out=args.out, tokenizer=args.tokenizer,
                            text_heads=args.text_heads, image_size=args.image_size, name=args.name)
    title = f"run {out['run_id']}" + (" (already imported)" if out["skipped"] else "")
    print_mapping(title, {k: v for k, v in out.items() if k not in ("run_id", "skipped")})
    return 0
