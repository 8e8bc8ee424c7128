"""The measurements behind the backend's default ``mass`` (issue 11: "the default is whichever wins"):
every mass target of a ``bench_structured`` run against the fixed budgets of the same run, cell by
cell, and an eval's sparse runs against dense. Reads committed JSON, measures nothing.

    python benchmarks/default_table.py benchmarks/results/bench_structured_h200_s7.json \\
        --eval benchmarks/results/eval_long_h200_s7.json > benchmarks/results/default_mass_s8.md
"""

from __future__ import annotations

import argparse
import json


def op_table(rows: list[dict]) -> list[str]:
    fixed = {(r["seq_len"], r["mix"]): r for r in rows if r["mode"] == "fixed"}
    modes = sorted({r["mode"] for r in rows} - {"fixed"})
    out = ["| N | mix | fixed: x cuDNN, error | " + " | ".join(
        f"{m}: x cuDNN, x fixed, error / fixed's" for m in modes) + " |",
           "|---|---|---|" + "---|" * len(modes)]
    wins = {m: [] for m in modes}
    for (n, mix), f in sorted(fixed.items()):
        cells = []
        for m in modes:
            r = next(x for x in rows if x["seq_len"] == n and x["mix"] == mix and x["mode"] == m)
            ratio = r["err_ref"] / f["err_ref"]
            wins[m].append((r["vs_fixed"], ratio))
            cells.append(f"{r['speedup']:.1f}x, {r['vs_fixed']:.2f}x, {ratio:.2f}")
        label = f"{n // 1024}K" if n < 1 << 20 else f"{n >> 20}M"
        out.append(f"| {label} | {mix} | {f['speedup']:.1f}x, {f['err_ref']:.4f} | " + " | ".join(cells) + " |")
    out.append("")
    for m, w in wins.items():
        held = [s for s, e in w if e <= 1.0]
        out.append(f"- {m}: {len(held)} of {len(w)} cells with an error no larger than the fixed budgets'; speed over "
                   f"fixed {min(s for s, _ in w):.2f}-{max(s for s, _ in w):.2f}x (on those cells "
                   f"{min(held):.2f}-{max(held):.2f}x)" if held else f"- {m}: no cell within the fixed budgets' error")
    return out


def eval_table(res: dict) -> list[str]:
    rows = res["rows"]
    dense = {r["length"]: r for r in rows if r["run"] == "dense"}
    out = ["| length | run | budget | needle | multi-key | ppl vs dense | kept density | ms / forward |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense[r["length"]]
        ppl = "-" if r["run"] == "dense" else f"{100 * (r['ppl'] / d['ppl'] - 1):+.2f}%"
        density = f"{r['density']:.3f}" if "density" in r else "-"
        out.append(f"| {r['length'] // 1024}K | {r['run']} | {r.get('budget') or '-'} | {100 * r['needle']:.1f}% | "
                   f"{100 * r['multikey']:.1f}% | {ppl} | {density} | {r['fwd_ms']:.1f} |")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("op", help="bench_structured JSON (rows with mode 'fixed' and mass targets)")
    p.add_argument("--eval", help="mif-compile eval results.json")
    args = p.parse_args(argv)
    with open(args.op) as f:
        rows = json.load(f)
    print(f"Op, `{args.op}` ({rows[0]['gpu']}, torch {rows[0]['torch']}): speedup over cuDNN, over the fixed "
          "budgets, and output error over the fixed budgets' error, per cell.\n")
    print("\n".join(op_table(rows)))
    if args.eval:
        with open(args.eval) as f:
            res = json.load(f)
        print(f"\nEval, `{args.eval}` ({res.get('device', '')}, {res.get('model', '')}); run names as they were "
              "then (in that session `ours` was the fixed budgets and `ours_adaptive` had mass=1.0):\n")
        print("\n".join(eval_table(res)))


if __name__ == "__main__":
    main()
