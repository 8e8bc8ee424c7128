"""Accuracy of sparse prefill against dense on a model: needle, multi-key retrieval, perplexity.

    python examples/eval_model.py                      # the built-in byte-level retrieval Llama, 1K-4K on CPU
    python examples/eval_model.py --model PATH --lengths 32768,65536

The same as ``python -m mif_compile.evaluate``, through the Python API. Sparse runs here use
min_seq_len=0 and max_density=1.0 so that the short lengths of a CPU run go through the sparse path.
"""

import argparse

import torch

from mif_compile import BackendConfig, HeadPattern
from mif_compile.evaluate import default_runs, evaluate, format_table, load_model

p = argparse.ArgumentParser()
p.add_argument("--model", default="builtin")
p.add_argument("--lengths", default="1024,2048,4096")
args = p.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
model, fmt, tok = load_model(args.model, device, torch.bfloat16 if device == "cuda" else torch.float32)
ours = BackendConfig(default_pattern=HeadPattern.vertical_slash(1000, 6096))  # the default mass=1.0
runs = default_runs(ours, a_shape=(128, 1024), block_sparse=None, fixed=True)  # + ours_fixed; min_seq_len=0, max_density=1.0 set here
res = evaluate(model, fmt, tok, runs, [int(n) for n in args.lengths.split(",")], depths=5, samples=1, keys=16,
               log=lambda _: None)
print(format_table(res))
