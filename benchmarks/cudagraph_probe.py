"""Which cache works with generate() under mode="reduce-overhead", for dense Inductor and for us.

A tiny fp16 Llama on the GPU, greedy generate, compared token for token with eager dense:
  compile x {dense Inductor, minference} x cache {dynamic, static (lazy: generate() makes it),
  static allocated before the first call (StaticCache.early_initialization)}
Prints one line per case (equal / different / the error) and writes cudagraph_probe.json.

    python benchmarks/cudagraph_probe.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    from torch._dynamo.utils import counters

    import mif_compile
    from mif_compile import HeadPattern
    from tests.backend.models import tiny_llama
    from tests.backend.test_cuda_backend import early_static_cache

    ids = torch.randint(0, 96, (1, 1500), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    full = HeadPattern.vertical_slash(4096, 4096)
    rows = []
    for backend in ("inductor", "minference"):
        for cache in ("dynamic", "static", "static-early"):
            torch._dynamo.reset()
            mif_compile.clear_reports()
            model = tiny_llama(hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=512).to("cuda", torch.float16)
            def kw():
                d = dict(max_new_tokens=8, do_sample=False, disable_compile=True)
                if cache == "static":
                    d["cache_implementation"] = "static"
                if cache == "static-early":
                    d["past_key_values"] = early_static_cache(model, 1600)
                return d

            with torch.no_grad():
                ref = model.generate(ids, **kw())
                if backend == "inductor":
                    model.forward = torch.compile(model.forward, mode="reduce-overhead")
                else:
                    model.forward = torch.compile(model.forward, backend="minference", options=dict(
                        mode="reduce-overhead", min_seq_len=0, default_pattern=full, max_density=1.0))
                try:
                    counters.clear()
                    out = model.generate(ids, **kw())
                    result = "equal to eager dense" if torch.equal(out, ref) else "DIFFERENT tokens"
                except Exception as e:  # noqa: BLE001  (the probe reports whatever fails)
                    result = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            sparse = sum(len(r.rewritten) for r in mif_compile.reports()) if backend == "minference" else 0
            skips = counters["inductor"]["cudagraph_skips"]
            rows.append(dict(backend=backend, cache=cache, result=result, sparse_sites=sparse, cudagraph_skips=skips))
            print(f"{backend:>10} {cache:>12} cache: {result} (sparse sites: {sparse}, cudagraph skips: {skips})",
                  flush=True)
    out_dir = os.environ.get("OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "cudagraph_probe.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
