"""Prefill a long prompt with a trained model, dense and through ``backend="minference"``.

    python examples/quickstart.py                   # GPU: 64K tokens; CPU: a short version (about 2K tokens)
    python examples/quickstart.py --seq-len 131072  # GPU: 128K tokens

The model is the one shipped with the package (``--model builtin``: a 2-layer byte-level Llama trained
to retrieve, ``mif_compile/data/retrieval-llama``). The prompt is real text (the Python standard
library's sources) with 16 key/value pairs hidden in it, and ends by asking for one key's value. The
script prefills it with the model as it is (eager, SDPA) and with ``torch.compile(model,
backend="minference")``, and prints what was rewritten and what ran at run time, the value each
retrieves (it must be the same), and the prefill time of both (median of a few runs after a warm-up
that compiles).

On a GPU the backend runs with its default settings, nothing overridden. On CPU speed means nothing
(the sparse path there is the pure-PyTorch reference, slower than dense SDPA, which is why the op's
``impl="auto"`` runs dense on CPU): the short version overrides ``impl="reference"``,
``min_seq_len=0`` and budgets scaled to the short prompt so that the sparse path really runs and
drops keys, and checks the answer. Speed is the GPU's job.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mif_compile
from mif_compile.evaluate import load_model
from mif_compile.tasks import default_text, multikey_sample

KEYS = 16


def prompt(fmt, tok, n: int, seed: int = 0) -> tuple[torch.Tensor, int, int]:
    """[1, n] ids: haystack text with ``KEYS`` needles, every key queried at the end (the earlier
    answers in place); the last token asks for the last key. Returns (ids, that key, its value)."""
    hay = tok.encode(default_text(8 * n + 100_000))
    sample = multikey_sample(fmt, hay, n + 1, KEYS, seed)
    start, (value,) = sample.answers[-1]
    assert start == n, (start, n)
    return torch.tensor([sample.ids[:n]]), sample.ids[n - 1], value


def timed(fn, device: str, repeats: int = 3) -> tuple[torch.Tensor, float]:
    """(output, median seconds of ``repeats`` runs after one warm-up run)."""
    out = fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _mass(text: str) -> float | str:
    return text if text == "fixed" else float(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=None, help="prompt length (default 65536 on a GPU, 2048 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 5 on GPU, 1 on CPU)")
    p.add_argument("--impl", default=None, choices=("auto", "reference", "triton"),
                   help="the op's implementation (default: the op's 'auto' on a GPU, 'reference' on CPU)")
    p.add_argument("--mass", type=_mass, default=None,
                   help="the backend setting mass: a target of the adaptive index (e.g. 0.99), or 'fixed' for "
                        "MInference's fixed budgets (default: not set, the backend's 1.0)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    dev = args.device
    gpu = dev.startswith("cuda")
    n = args.seq_len or (65536 if gpu else 2048)
    repeats = args.repeats or (5 if gpu else 1)
    model, fmt, tok = load_model("builtin", dev, torch.bfloat16 if gpu else torch.float32)
    ids, key, value = prompt(fmt, tok, n, args.seed)
    ids = ids.to(dev)
    cfg = model.config
    print(f"model: the shipped retrieval Llama ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
          f"{cfg.num_key_value_heads} kv heads, head dim {cfg.head_dim}, byte-level, {model.dtype}) on {dev}")
    print(f"prompt: {n} tokens of the standard library's sources with {KEYS} key/value pairs hidden in it; "
          f"the last token asks for key {key}, whose value is {value}")

    if gpu:
        options = {} if args.impl is None else {"impl": args.impl}
        if args.mass is not None:
            options["mass"] = args.mass
        print("backend: torch.compile(model, backend='minference')"
              + (f" with options={options}" if options else ", default settings"))
    else:
        # a short prompt: MInference's budgets (1000, 6096) would keep every key, so scale them down
        pattern = mif_compile.HeadPattern.vertical_slash(max(30, n // 16), max(64, n // 32))
        options = {"impl": args.impl or "reference", "min_seq_len": 0, "default_pattern": pattern}
        if args.mass is not None:
            options["mass"] = args.mass
        print(f"backend: CPU demo, options={{'impl': {options['impl']!r}, 'min_seq_len': 0, 'default_pattern': "
              f"{pattern.describe()}{', mass: %r' % args.mass if args.mass is not None else ''}}} (the defaults "
              "would run this short prompt dense)")
    sparse_model = torch.compile(model, backend="minference", options=options)

    def dense():
        with torch.no_grad():
            return model(ids, logits_to_keep=1, use_cache=False).logits.float()

    def sparse():
        with torch.no_grad():
            return sparse_model(ids, logits_to_keep=1, use_cache=False).logits.float()

    ref, t_dense = timed(dense, dev, repeats)
    out, t_sparse = timed(sparse, dev, repeats)
    report = mif_compile.last_report()
    print(report)
    print(report.run_summary())
    a_dense, a_sparse = int(ref[0, -1].argmax()), int(out[0, -1].argmax())
    err = ((out - ref).norm() / ref.norm()).item()
    verdict = "the same" if a_dense == a_sparse else "DIFFERENT"
    print(f"answer: dense {a_dense}, minference {a_sparse} ({verdict}; expected {value}); "
          f"last-token logits relative error {err:.2e}")
    runs = f"median of {repeats} run(s) after a warm-up"
    if gpu:
        print(f"prefill {n} tokens ({runs}): dense {t_dense * 1e3:.1f} ms, minference {t_sparse * 1e3:.1f} ms, "
              f"speedup {t_dense / t_sparse:.2f}x")
    else:
        print(f"prefill {n} tokens on CPU ({runs}): dense {t_dense * 1e3:.0f} ms, minference (pure-PyTorch "
              f"reference) {t_sparse * 1e3:.0f} ms. CPU times say nothing about speed: the reference path is the "
              "oracle, not a fast kernel. Speed is the GPU's job: run this on a GPU (64K tokens by default, "
              "--seq-len 131072 for 128K).")


if __name__ == "__main__":
    main()
