"""Does the search's choice hold on another input? Fixed-budget vs mass-targeted candidates (CPU).

Searches the shipped retrieval model (2 layers x 8 heads) on one multi-key calibration prompt with
``--modes fixed`` and with ``--modes fixed,mass`` (the same fixed candidates as
``eval_searched.py`` plus the default adaptive caps and targets), then captures q/k on *held-out*
prompts of the same kind and length and measures, for every head's chosen pattern, the recall (share
of the dense softmax mass kept, sampled rows) and the kept pairs (kernel cost, as the search counts
them) of the index the op builds on that input. A mass-targeted choice re-selects per input from the
last-query probe, so this is where its estimate could miss.

    python benchmarks/search_modes.py --out benchmarks/results        # about 12 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from mif_compile.evaluate import load_model
from mif_compile.search import SearchSettings, capture_backend, capture_qk, model_counts, parse_candidates, score_layer, search
from mif_compile.tasks import default_text, multikey_sample

from eval_searched import CANDIDATES  # noqa: E402  (run from benchmarks/ or with it on the path)


def heldout_scores(model, ids, plan, settings):
    """Per layer and head: (recall, cost) of the plan's own pattern on ``ids``."""
    layers, heads = model_counts(model)
    with torch.no_grad(), capture_qk(store=True) as cap:
        torch.compile(model, backend=capture_backend(layers, heads))(ids, use_cache=False, logits_to_keep=1)
    out = []
    for i, layer in enumerate(plan.layers):
        q, k, scale = cap.records[i]
        cands = tuple(dict.fromkeys(hp.__class__(hp.pattern, hp.budget, None, hp.mass) for hp in layer))
        st = SearchSettings(candidates=cands, cost="pairs", modes=settings.modes, masses=(), mass_caps=(),
                            n_last=settings.n_last, n_spread=settings.n_spread)
        sc = score_layer(q, k, None, scale, st, layer=i)
        row = []
        for h, hp in enumerate(layer):
            c = cands.index(hp.__class__(hp.pattern, hp.budget, None, hp.mass))
            row.append((sc.recall[h][c], sc.cost[h][c]))
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--heldout", type=int, default=3, help="held-out prompts")
    p.add_argument("--target", type=float, default=0.95)
    args = p.parse_args()
    torch.manual_seed(0)
    model, fmt, tok = load_model("builtin", "cpu", torch.float32)
    hay = tok.encode(default_text(400_000))
    calib = torch.tensor([multikey_sample(fmt, hay, args.seq_len, 16, seed=1234).ids])
    rows, text = [], []
    for modes in (("fixed",), ("fixed", "mass")):
        st = SearchSettings(candidates=parse_candidates(CANDIDATES), cost="pairs", modes=modes, target=args.target)
        res = search(model, calib, settings=st, progress=False)
        name = ",".join(modes)
        heads = [hp for layer in res.plan.layers for hp in layer]
        cal_cost = [sc.cost[h][sc.candidates.index(res.plan.layers[i][h].__class__(
            hp.pattern, hp.budget, None, hp.mass))] for i, sc in sorted(res.scores.items())
            for h, hp in enumerate(res.plan.layers[i])]
        text.append(f"== --modes {name}\n{res.plan.summary()}")
        text.append(f"calibration: recall mean {sum(hp.score for hp in heads) / len(heads):.4f} min "
                    f"{min(hp.score for hp in heads):.4f}, cost (kept pairs + estimation, share of causal) mean "
                    f"{sum(cal_cost) / len(cal_cost):.4f}")
        for s in range(args.heldout):
            ids = torch.tensor([multikey_sample(fmt, hay, args.seq_len, 16, seed=7000 + s).ids])
            got = [rc for layer in heldout_scores(model, ids, res.plan, st) for rc in layer]
            rec = [r for r, _ in got]
            cost = [c for _, c in got]
            below = sum(r < args.target for r in rec)
            text.append(f"held-out {s}: recall mean {sum(rec) / len(rec):.4f} min {min(rec):.4f} "
                        f"({below} of {len(rec)} heads below {args.target}), cost mean {sum(cost) / len(cost):.4f}")
            rows.append({"modes": name, "heldout": s, "recall": rec, "cost": cost,
                         "plan": [hp.describe() for hp in heads]})
    report = "\n".join(text)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "search_modes_cpu.txt"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, "search_modes_cpu.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
