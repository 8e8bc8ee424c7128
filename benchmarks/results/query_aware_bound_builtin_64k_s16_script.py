"""Prototype (not the op): a query-aware block index on the shipped model. For each sampled row's 128-query
block, probe queries (every STRIDE-th row of the block) give exact per-64-key-tile masses; the block keeps the
union, over probes, of each probe's own top tiles covering `cover` of its mass, plus its diagonal tiles and
the sink tile. Evaluated on the sampled rows (which are not probes unless by chance), like index_quality."""
import sys, torch
sys.path.insert(0, "benchmarks")
import index_quality as IQ
from structured import sample_rows, _row_probs
n = int(sys.argv[1]); BM, BN = 128, 64
layers = IQ.model_layers(n)
rows = sample_rows(n, 128)
nt = (n + BN - 1) // BN
for li, (q, k, v, scale) in enumerate(layers):
    P, O, V = IQ.exact_rows(q, k, v, rows, scale)
    H = P.shape[0]
    print(f"# layer {li}", flush=True)
    blocks = (rows // BM).tolist()
    for stride in (32, 8):
        for cover in (0.95, 0.99):
            mask = torch.zeros(H, len(rows), n, dtype=torch.bool)
            kept_t = tot_t = 0
            for bi, b in enumerate(blocks):
                r0 = b * BM
                probes = torch.arange(r0 + stride - 1, min(r0 + BM, n), stride)
                last = min(r0 + BM, n) - 1
                ct = last // BN + 1  # causal tiles of the block
                for h in range(H):
                    pp = _row_probs(q, k, 0, h, probes, scale)  # [p, N]
                    t = torch.nn.functional.pad(pp, (0, nt * BN - n)).view(len(probes), nt, BN).sum(-1)[:, :ct]
                    s, order = t.sort(-1, descending=True)
                    need = (s.cumsum(-1) - s) < cover  # tiles until the probe's cover is reached
                    keep = torch.zeros(ct, dtype=torch.bool)
                    for p in range(len(probes)):
                        keep[order[p][need[p]]] = True
                    keep[0] = True
                    keep[r0 // BN:] = True  # the block's own diagonal tiles
                    kept_t += int(keep.sum()); tot_t += ct
                    km = keep.repeat_interleave(BN)[:n]
                    km = torch.nn.functional.pad(km, (0, n - km.numel()))
                    mask[h, bi] = km & (torch.arange(n) <= rows[bi])
            Pm = P * mask
            kept = Pm.sum(-1)
            Os = (Pm / Pm.sum(-1, keepdim=True).clamp(min=1e-30)) @ V
            err = float((Os - O).norm() / O.norm())
            print(f"probe stride {stride:3d} cover {cover}: tile density {kept_t / tot_t:.4f} err {err:.4f} "
                  f"kept {float(kept.mean()):.4f} (min {float(kept.min()):.3f})", flush=True)
