"""`tatitok-fast demo --out DIR [--quick] [--force] [--seed N]`: the whole product offline on
procedural shapes: make data, train a micro TA-TiTok VQ, tokenize, train a tiny MaskGen-VQ,
generate for seen and held-out prompts, score them; report.md, report.json, grid.png and
curves.png (learning curves) in DIR. Afterwards `tatitok-fast generate "a green triangle"
--generator DIR/generator --tokenizer DIR/tokenizer -o out/` works with no other flag."""
from __future__ import annotations

import argparse

from tatitok_fast.cli.common import CommandError, run_command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train and score a tiny tokenizer + generator on procedural shapes",
                              description=__doc__)
    p.add_argument("--out", required=True, help="output directory (must be new or empty, unless --force)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few images and steps (about a minute)")
    p.add_argument("--force", action="store_true",
                   help="reuse a non-empty DIR: the demo's own outputs in it are replaced, nothing else")
    p.add_argument("--seed", type=int, default=0, help="seed of data, training and sampling (default 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run_command(demo))


def demo(args: argparse.Namespace) -> int:
    from tatitok_fast.demo.run import DemoError, run_demo

    try:
        results = run_demo(args.out, quick=args.quick, force=args.force, seed=args.seed,
                           progress=None if args.progress else False)
    except DemoError as exc:
        raise CommandError(str(exc)) from None
    tok, adherence = results.get("tokenizer", {}), results["adherence"]
    if "psnr" in tok:
        print(f"tokenizer: PSNR {tok['psnr']:.2f} dB on fresh renders (the mean image: "
              f"{tok.get('mean_image_psnr', float('nan')):.2f} dB)")
    for gen, by_split in adherence.items():
        print(f"{gen} generator: " + "; ".join(f"{split} prompts colour {sc['color_acc']:.1%} shape "
                                               f"{sc['shape_acc']:.1%}" for split, sc in by_split.items()))
    print(f"wrote report.md, report.json, grid.png and curves.png to {args.out} in {results['total_seconds']:.0f} s")
    return 0
