"""Merge bench_prefill.py result files (one model size) into one table, JSON and plot.

    python benchmarks/plot_prefill.py benchmarks/results/bench_prefill_l32_s2.json \
        benchmarks/results/bench_prefill_l32_256k_s2.json benchmarks/results/bench_prefill_l32_512k_s2.json \
        --out benchmarks/results/prefill_llama3_8b_h100

Prints a Markdown table (the README quotes it); a later file's row replaces an earlier one for the
same (length, plan).
"""

from __future__ import annotations

import argparse
import json
import math


def fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def plot(rows: list[dict], path: str, title: str) -> None:
    """TTFT per plan with the dense baselines (left), speedup per plan (right); skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for plan in sorted({r["plan"] for r in rows}):
        r = [x for x in rows if x["plan"] == plan]
        ax[0].plot([x["seq_len"] for x in r], [x["ours_s"] for x in r], "o-", label=f"minference ({plan})")
        ax[1].plot([x["seq_len"] for x in r], [x["speedup"] for x in r], "o-", label=plan)
    dense = {x["seq_len"]: x for x in rows}
    ns = sorted(dense)
    ax[0].plot(ns, [dense[n]["dense_s"] for n in ns], "s--", label="dense (eager SDPA, cuDNN)")
    comp = [(n, dense[n].get("compiled_dense_s")) for n in ns]
    comp = [(n, t) for n, t in comp if t is not None and not math.isnan(t)]
    if comp:
        ax[0].plot(*zip(*comp), "^:", label="dense (torch.compile)")
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xlabel("prompt tokens")
        a.legend()
    ax[0].set_yscale("log")
    ax[0].set_ylabel("TTFT (s)")
    ax[1].set_ylabel("speedup over the fastest dense")
    ax[1].axhline(1.0, color="gray", lw=0.5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True, help="path stem for .json, .md and .png")
    args = p.parse_args()
    rows = {}
    for path in args.files:
        for r in json.load(open(path)):
            rows[(r["seq_len"], r["plan"])] = dict(r, file=path.rsplit("/", 1)[-1])
    rows = [rows[k] for k in sorted(rows)]
    layers = sorted({r["layers"] for r in rows})
    gpu = sorted({r["gpu"] for r in rows})
    lines = [
        f"Llama-3-8B shape ({'/'.join(map(str, layers))} layers), random bf16 weights, batch 1, one forward with "
        f"logits_to_keep=1; {', '.join(gpu)}",
        "",
        "| N | plan | dense eager cuDNN (s) | torch.compile dense (s) | minference (s) | speedup | peak GB dense / ours "
        "| kept density | dense-fallback layers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seq_len'] // 1024}K | {r['plan']} | {fmt(r['dense_s'], '.3f')} | {fmt(r.get('compiled_dense_s'), '.3f')} "
            f"| {fmt(r['ours_s'], '.3f')} | {fmt(r['speedup'], '.2f')}x | {fmt(r['dense_peak_gb'], '.1f')} / "
            f"{fmt(r['ours_peak_gb'], '.1f')} | {r['mean_density']:.3f} | {r['dense_fallback_layers']}/{r['layers']} |"
        )
    table = "\n".join(lines)
    print(table)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, args.out + ".png", f"Prefill TTFT, Llama-3-8B shape, {', '.join(gpu)}")


if __name__ == "__main__":
    main()
