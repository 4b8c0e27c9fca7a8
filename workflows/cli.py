"""The `rayclip` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayclip", description="CLIP as a distributed workflow on Ray")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="the embedded default: train a tiny CLIP on synthetic pairs, zero-shot it")
    demo.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    demo.add_argument("--batch-size", type=int, default=64, help="contrastive batch (default 64)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rayclip {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
