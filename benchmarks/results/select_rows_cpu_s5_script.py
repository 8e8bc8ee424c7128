# CPU diagnostic of session 5 (run from the repo root: PYTHONPATH=. python benchmarks/results/select_rows_cpu_s5_script.py 131072 mixed 0.95,0.99)
import sys, torch, math, time
sys.path.insert(0, 'benchmarks')
from structured import structured_qkv
from mif_compile import ops
from mif_compile.kernels import reference as R
N = int(sys.argv[1]); mix = sys.argv[2]
masses = [float(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0.99]
H, G, D, BM = 8, 2, 128, 128
t0 = time.time()
q, k, v = structured_qkv(mix, heads=H, kv_heads=G, seq_len=N, dtype=torch.bfloat16)
qf, kf, vf = q.float(), k.float(), v.float()
scale = D ** -0.5
rows = torch.linspace(N // 2, N - 1, 128).round().long()
P = []
for h in range(H):
    s = (qf[0, h, rows] @ kf[0, h // (H // G)].T) * scale
    s.masked_fill_(torch.arange(N)[None] > rows[:, None], float("-inf"))
    P.append(torch.softmax(s, -1))
P = torch.stack(P); VV = vf[0].repeat_interleave(H // G, 0); O = P @ VV
off = rows[:, None] - torch.arange(N)[None]
def report(name, idx):
    pos, ok = R._kept_keys(idx, rows // BM, N, 64)  # [1,H,R,P]
    m = torch.zeros(H, len(rows), N + 1, dtype=torch.bool)
    m.scatter_(-1, torch.where(ok[0], pos[0], N), True); m = m[..., :N] & (off[None] >= 0)
    kept = (P * m).sum(-1)
    Pm = P * m; Pm = Pm / Pm.sum(-1, keepdim=True); Os = Pm @ VV
    err = float((Os - O).norm() / O.norm()); herr = ((Os - O).norm(dim=(1,2)) / O.norm(dim=(1,2)))
    dens = float(ops.kept_density(idx, N, BM))
    miss = P * ~m
    bk = " ".join(f"{float((miss * ((off >= lo) & (off < hi))).sum(-1).mean()):.4f}" for lo, hi in
                  [(0, 320), (320, 4096), (4096, N // 16), (N // 16, N)])
    print(f"{mix} {N} {name:7s} dens {dens:.4f} err {err:.4f} kept mean {kept.mean():.4f} min {kept.min():.4f} | missed by offset {bk} | per-head err {[round(float(x),3) for x in herr]}", flush=True)
report("fixed", ops.build_layer_index(q, k, None, scale, [2]*H, [1000]*H, [6096]*H, impl="reference"))
info = {}
for ms in masses:
    info = {}
    idx = ops.build_layer_index(q, k, None, scale, [2]*H, [1000]*H, [6096]*H, impl="reference", mass=[ms]*H, info=info)
    report(f"m{ms}", idx); print("   missed heads", int(info.get("missed", -1)))
print("time", time.time() - t0)
