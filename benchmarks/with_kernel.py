"""Run a benchmark script with the sparse kernel's launch options changed (kernels/attention.py's module
defaults ``PAIR`` / ``FOLD`` / ``TMA``), for every launch the script makes, the backend's included:

    python benchmarks/with_kernel.py --pair -- benchmarks/profile_model.py --lengths 131072 --layers 2
"""

from __future__ import annotations

import argparse
import runpy
import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: with_kernel.py [--pair] [--fold] [--tma] -- SCRIPT [ARGS...]")
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", action="store_true", help="two index blocks (2 x 64 keys) per tile")
    p.add_argument("--fold", action="store_true", help="the softmax scale inside the exponent's FMA")
    p.add_argument("--tma", action="store_true", help="off-band blocks read through tensor descriptors")
    args = p.parse_args(argv[:cut])
    script, rest = argv[cut + 1], argv[cut + 2:]
    from mif_compile.kernels import attention

    attention.PAIR, attention.FOLD, attention.TMA = args.pair, args.fold, args.tma
    print(f"# kernel: PAIR={attention.PAIR} FOLD={attention.FOLD} TMA={attention.TMA}", flush=True)
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
