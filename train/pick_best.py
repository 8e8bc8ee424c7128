"""Pick the best of several ``train_retrieval.py`` runs (mean dense accuracy over the evaluated lengths).

    python train/pick_best.py WORK_DIR OUT_DIR

Copies the winner's ``model.safetensors``, ``config.json`` and ``mif_eval.json`` to ``OUT_DIR/model``
and writes ``OUT_DIR/train_logs.json`` with every run's JSON log and the tail of its stdout.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys


def main(work: str, out: str) -> int:
    runs = {}
    for log in sorted(glob.glob(os.path.join(work, "*", "train_log.json"))):
        with open(log) as f:
            runs[os.path.basename(os.path.dirname(log))] = json.load(f)
    tails = {}
    for path in sorted(glob.glob(os.path.join(work, "*.log"))):
        with open(path) as f:
            tails[os.path.basename(path)[:-4]] = f.read()[-4000:]

    def score(name):
        final = runs[name].get("final_dense", {})
        if not final:
            return -1.0
        return sum(v["acc"] for v in final.values()) / len(final)  # mean over the evaluated lengths

    best = max(runs, key=score) if runs else None
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_logs.json"), "w") as f:
        json.dump({"best": best, "scores": {n: score(n) for n in runs}, "runs": runs, "stdout_tails": tails}, f, indent=1)
    if best is None:
        print("no run finished", file=sys.stderr)
        return 1
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    for name in ("model.safetensors", "config.json", "mif_eval.json"):
        shutil.copy(os.path.join(work, best, name), os.path.join(out, "model", name))
    print(f"best run: {best} ({score(best):.4f}); scores " + ", ".join(f"{n} {score(n):.4f}" for n in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
