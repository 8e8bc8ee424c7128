"""The shipped model's exact attention at N (argv[1]) on 128 sampled rows of one multi-key prompt (CPU): per
head, the median over rows of the share of each row's causal keys, and of its 64-key tiles, that hold 90/95/99%
of the row's softmax mass. Per row, so a lower bound for an index whose tiles serve 128-query blocks.
Run from the repository root: python benchmarks/results/model_sparsity_builtin_64k_s16_script.py 65536"""
import sys, torch
sys.path.insert(0, "benchmarks")
from index_quality import model_layers, exact_rows
from structured import sample_rows
n = int(sys.argv[1])
layers = model_layers(n)
rows = sample_rows(n, 128)
for li, (q, k, v, scale) in enumerate(layers):
    P, O, V = exact_rows(q, k, v, rows, scale)  # [H, R, N]
    H = P.shape[0]
    for tgt in (0.9, 0.95, 0.99):
        kf, tf = [], []
        for h in range(H):
            p = P[h]
            s = p.sort(-1, descending=True).values.cumsum(-1)
            need = (s < tgt).sum(-1) + 1
            r = torch.as_tensor(rows, dtype=torch.float64) + 1
            kf.append((need / r).median().item())
            t = torch.nn.functional.pad(p, (0, (-n) % 64)).view(p.shape[0], -1, 64).sum(-1)
            st = t.sort(-1, descending=True).values.cumsum(-1)
            tneed = (st < tgt).sum(-1) + 1
            tf.append((tneed / torch.ceil(r / 64)).median().item())
        print(f"layer {li} mass {tgt}: keys/row share (median over rows) per head {[round(x,3) for x in kf]}; 64-key tiles share {[round(x,3) for x in tf]}", flush=True)
