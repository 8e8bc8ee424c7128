"""``mif-compile`` / ``python -m mif_compile``: plan tooling.

    mif-compile show PLAN.json                 per-layer summary of a plan (ours or MInference's)
    mif-compile convert IN.json OUT.json [--to minference|ours]
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_plan, save_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mif-compile", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print a per-layer summary of a plan")
    show.add_argument("plan")
    conv = sub.add_parser("convert", help="convert a plan between our JSON and MInference's")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=("ours", "minference"), default="ours")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan if args.cmd == "show" else args.src)
        if args.cmd == "show":
            print(plan.summary())
        else:
            save_plan(plan, args.dst, minference_format=args.to == "minference")
            print(f"wrote {args.dst} ({args.to} format, {plan.num_layers} layers)")
    except ConfigError as e:
        print(f"mif-compile: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
