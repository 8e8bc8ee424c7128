"""Accuracy at real sparsity on the shipped retrieval model (CPU, reference path).

Searches a plan on one 8K multi-key calibration prompt (kept-pair cost, recall target 0.95), then
evaluates dense, the searched plan, a tight vertical-slash budget and A-shape at 8K and 16K with the
harness (same inputs for every run), printing kept density next to accuracy.

    python benchmarks/eval_searched.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from mif_compile import BackendConfig, HeadPattern
from mif_compile.evaluate import Run, evaluate, format_table, load_model
from mif_compile.search import SearchSettings, parse_candidates, search
from mif_compile.tasks import default_text, multikey_sample

CANDIDATES = ["a_shape:64,512", "a_shape:128,2048", "vertical_slash:30,100", "vertical_slash:100,300",
              "vertical_slash:200,800", "vertical_slash:500,2000", "block_sparse:8", "block_sparse:32", "dense"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--lengths", default="8192,16384")
    p.add_argument("--samples", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(0)
    model, fmt, tok = load_model("builtin", "cpu", torch.float32)
    hay = tok.encode(default_text(400_000))
    calib = torch.tensor([multikey_sample(fmt, hay, 8192, 16, seed=1234).ids])
    plan_path = os.path.join(args.out, "eval_searched_plan.json")
    res = search(model, calib, settings=SearchSettings(candidates=parse_candidates(CANDIDATES), cost="pairs"),
                 out=plan_path, state_dir=os.path.join("/tmp", "eval_searched.search"), progress=False)
    print(res.plan.summary())
    base = dict(min_seq_len=0, max_density=1.0)
    runs = [
        Run("dense"),
        Run("searched", BackendConfig(plan=res.plan, **base)),
        Run("vs(100,300)", BackendConfig(default_pattern=HeadPattern.vertical_slash(100, 300), **base)),
        Run("a_shape(128,2048)", BackendConfig(default_pattern=HeadPattern.a_shape(128, 2048), **base)),
    ]
    lengths = [int(x) for x in args.lengths.split(",")]
    out = evaluate(model, fmt, tok, runs, lengths, samples=args.samples, depths=6, keys=16, ppl_samples=1)
    table = format_table(out)
    print(table)
    with open(os.path.join(args.out, "eval_searched_cpu.txt"), "w") as f:
        f.write(res.plan.summary() + "\n\n" + table + "\n")
    with open(os.path.join(args.out, "eval_searched_cpu.json"), "w") as f:
        json.dump(out["rows"], f, indent=1, default=str)


if __name__ == "__main__":
    main()
