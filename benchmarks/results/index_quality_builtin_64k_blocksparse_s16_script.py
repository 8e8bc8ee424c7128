"""MInference's block-sparse index (mean-pooled 128-query blocks against 64-key tiles, top-k tiles a block) on
the shipped model's two layers at N (argv[1]), one multi-key prompt, measured like benchmarks/index_quality.py
(density, output error of 128 sampled rows). Run from the repository root (CPU, ~2 min at 65536)."""
import sys, torch
sys.path.insert(0, "benchmarks")
import index_quality as IQ
from structured import sample_rows
from mif_compile import HeadPattern, ops
n = int(sys.argv[1])
layers = IQ.model_layers(n)
rows = sample_rows(n, 128)
for li, (q, k, v, scale) in enumerate(layers):
    P, O, V = IQ.exact_rows(q, k, v, rows, scale)
    H, G = q.shape[1], k.shape[1]
    print(f"# layer {li}", flush=True)
    for tk in (16, 32, 64, 100, 200):
        codes, b0, b1 = ops.encode_heads([HeadPattern.block_sparse(tk)])
        idx = [ops.build_layer_index(q[:, h:h + 1], k[:, h // (H // G):h // (H // G) + 1], None, scale, codes, b0, b1,
                                     impl="reference", block_m=128) for h in range(H)]
        IQ.measure(f"block{tk}", idx, P, O, V, rows, n, None)
