"""Search a per-head plan on one calibration prefill, then compile with it.

    python examples/search_plan.py                                  # CPU: a 2-layer random Llama, 2K tokens
    python examples/search_plan.py --model PATH --seq-len 32768     # a HF model on a GPU: measured kernel times

Like ``mif-compile search --model tiny --seq-len 2048 --out plan.json``. Random weights give diffuse
attention, which no sparse pattern serves more cheaply than dense: expect "dense" everywhere from the
tiny model; a trained model's heads are sparse. Without ``--out`` the plan and the per-layer state go
to a temporary folder, removed at the end; with ``--out plan.json`` they are kept, and an interrupted
run resumes: finished layers are read back from ``plan.json.search/``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import mif_compile
from mif_compile.cli import calibration_ids, load_model
from mif_compile.search import DEFAULT_CANDIDATES, SearchSettings, parse_candidates, search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="HF model path, or tiny / random:layers=..,heads=..")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", default=None, help="keep the plan here (and its state in OUT.search/, to resume)")
    args = p.parse_args()
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            run(args, os.path.join(tmp, "plan.json"))
        print("the plan was not kept (--out plan.json keeps it)")
    else:
        run(args, args.out)
        print(f"wrote {args.out}")


def run(args, out: str) -> None:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, tokenizer = load_model(args.model, args.device, dtype)
    ids = calibration_ids(model, tokenizer, args.seq_len, None).to(args.device)

    # the defaults suit ~32K tokens; short prompts need short budgets
    short = parse_candidates(["a_shape:64,256 a_shape:128,512", "vertical_slash:30,100 vertical_slash:100,300",
                              "block_sparse:4 block_sparse:8", "dense"])
    settings = SearchSettings(candidates=DEFAULT_CANDIDATES if args.seq_len >= 16384 else short,
                              rule="target", target=0.95)
    result = search(model, ids, settings=settings, out=out, forward_kwargs={"use_cache": False})
    print(result.plan.summary())

    # model=: the plan's layer and head counts are checked against the model here, not graph by graph
    compiled = torch.compile(model, backend=mif_compile.backend(result.plan, min_seq_len=0, model=model))
    with torch.no_grad():
        err = (compiled(ids).logits - model(ids).logits).abs().max()
    print(mif_compile.last_report().summary())
    print(f"max |logits - dense| with the plan: {float(err):.3g}")


if __name__ == "__main__":
    main()
