"""How good is an index, independent of the kernel's speed (CPU, reference path).

For a structured input (benchmarks/structured.py) this builds the layer index the op would build
(fixed budgets, and the mass-targeted selection at each ``--mass``), then measures on sampled rows of
the second half, against exact float32 attention of those rows:
- ``dens``: the kept density the kernel pays for (ops.kept_density, tiles x 64 + columns);
- ``err``: relative L2 error of the output of the sampled rows (the kept keys only, renormalised, as
  the kernel computes it), the number bench_structured calls err_ref;
- ``kept``: the true softmax mass the index keeps per row (mean, min);
- where the missed mass is, by offset (row - key) bins, and at the sink / heavy keys.
The kernel's time on the GPU follows the density (plus the estimation, which does not depend on the
choice), so two choices can be compared here at the N of the GPU benchmarks: 128K takes a few
minutes on 2 cores. Usage, from the repository root:

    python benchmarks/index_quality.py --seq-len 131072 --mix mixed,slash --mass 0.95,0.98,0.99 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from structured import MIXES, _row_probs, sample_rows, structured_qkv  # noqa: E402

from mif_compile import ops  # noqa: E402
from mif_compile.kernels import reference as R  # noqa: E402

BLOCK_M = 128


def exact_rows(q, k, v, rows, scale):
    """fp32 probabilities [H, R, N] and outputs [H, R, Dv] of the sampled rows (batch 0), causal."""
    H, G = q.shape[1], k.shape[1]
    P = torch.stack([_row_probs(q, k, 0, h, rows, scale) for h in range(H)])
    V = v[0].float().repeat_interleave(H // G, 0)
    return P, P @ V, V


def kept_mask(indexes, rows, n):
    """bool [H, R, N]: the keys each head's index (a list, batch 1, one head each) gives each sampled row,
    causal. Heads are built and read one at a time: at 512K one head's reference index is ~1 GB."""
    m = torch.zeros(len(indexes), len(rows), n + 1, dtype=torch.bool)
    for h, index in enumerate(indexes):
        pos, ok = R._kept_keys(index, rows // BLOCK_M, n, 64)
        m[h].scatter_(-1, torch.where(ok[0, 0], pos[0, 0], n), True)
    return m[..., :n] & (torch.arange(n)[None, None] <= rows[None, :, None])


def layer_index(scores, q, k, scale, vb, sb, mass=None):
    """The op's index of every head (ops.build_layer_index, reference path), one head per call: a list
    of per-head indexes, and the summed ``info`` counts and the heads' estimated shares (adaptive)."""
    H, G = q.shape[1], k.shape[1]
    out, missed, fixed, shares = [], 0, 0, []
    for h in range(H):
        info = {}
        g = h // (H // G)
        out.append(ops.build_layer_index(
            q[:, h:h + 1], k[:, g:g + 1], None, scale, [2], [vb], [sb], impl="reference",
            block_m=BLOCK_M, vs_scores=(scores[0][:, h:h + 1], scores[1][:, h:h + 1]),
            mass=None if mass is None else [mass],
            info=info))
        if mass is not None:
            missed += int(info["missed"])
            fixed += int(info["fixed"])
            shares.append(round(float(_SEEN["share"][0, 0]), 4))
    return out, dict(missed=missed, fixed=fixed, shares=shares)


_SEEN: dict = {}  # the last selection's estimated share (set by the recording wrapper in main)


BINS = ((0, 320), (320, 1024), (1024, 4096), (4096, 16384), (16384, 1 << 40))


def measure(name, index, P, O, V, rows, n, st):
    m = kept_mask(index, rows, n)
    kept = (P * m).sum(-1)  # [H, R]
    Pm = P * m
    Os = (Pm / Pm.sum(-1, keepdim=True).clamp(min=1e-30)) @ V
    err = float((Os - O).norm() / O.norm())
    head_err = ((Os - O).norm(dim=(1, 2)) / O.norm(dim=(1, 2))).tolist()
    dens = sum(float(ops.kept_density(x, n, BLOCK_M)) for x in index) / len(index)
    miss = P * ~m
    off = rows[:, None] - torch.arange(n)[None]
    by_off = {f"{lo}-{hi if hi < 1 << 40 else 'N'}": float((miss * ((off >= lo) & (off < hi))).sum(-1).mean())
              for lo, hi in BINS}
    if st is not None:
        heavy = torch.zeros(P.shape[0], n, dtype=torch.bool)
        H, G = P.shape[0], len(st.heavy)
        for h in range(H):
            heavy[h, list(st.heavy[h // (H // G)])] = True
            heavy[h, 0] = True
        by_off["sink+heavy"] = float((miss * heavy[:, None, :]).sum(-1).mean())
    row = dict(name=name, density=dens, err=err, kept_mean=float(kept.mean()), kept_min=float(kept.min()),
               missed=by_off, head_err=[round(x, 4) for x in head_err])
    print(f"{name:12s} dens {dens:.4f} err {err:.4f} kept {row['kept_mean']:.4f} (min {row['kept_min']:.3f}) "
          f"| missed " + " ".join(f"{k} {v:.4f}" for k, v in by_off.items())
          + f" | heads {row['head_err']}", flush=True)
    return row


def oracle_index(P, rows, st, n, target, cap_s_groups=96):
    """The vertical-slash index chosen by the TRUE mass of the sampled rows (in-sample: a bound on what
    a better estimate could reach with these candidates, not a method): the sink and the heavy keys as
    columns, then 64-diagonal groups in order of true mass until the kept mean mass reaches ``target``
    (at most ``cap_s_groups`` groups)."""
    from mif_compile import kernels as K

    H, G = P.shape[0], len(st.heavy)
    off = (rows[:, None] - torch.arange(n)[None]).clamp(min=0)  # [R, N]
    grp = (off // 64).long()
    ng = math.ceil(n / 64)
    v_list, s_list = [], []
    for h in range(H):
        cols = torch.tensor([0, *st.heavy[h // (H // G)]])
        colmask = torch.zeros(n, dtype=torch.bool)
        colmask[cols] = True
        p = P[h] * (~colmask)[None]
        gm = torch.zeros(len(rows), ng).scatter_add_(1, grp, p).mean(0)  # true mass per group
        have = float(P[h][:, cols].sum(-1).mean())
        order = gm.argsort(descending=True)
        cum = have + gm[order].cumsum(0)
        k_need = int((cum < target).sum()) + 1
        chosen = torch.cat([torch.tensor([0, 1]), order[: min(k_need, cap_s_groups)]]).unique()
        v_list.append(cols)
        s_list.append((chosen[:, None] * 64 + torch.arange(64)).flatten())
    vw = max(len(x) for x in v_list)
    sw = max(len(x) for x in s_list)
    v_idx = torch.full((1, H, vw), -1, dtype=torch.int32)
    s_off = torch.full((1, H, sw), -1, dtype=torch.int32)
    for h in range(H):
        v_idx[0, h, : len(v_list[h])] = v_list[h].int()
        s = s_list[h][s_list[h] < n]
        s_off[0, h, : len(s)] = s.int()
    from mif_compile.kernels.select import adaptive_cap_s

    cap_s = min(adaptive_cap_s(sw // 64, BLOCK_M), ng + 1)
    return [K.build_vs_index(v_idx[:, h:h + 1], s_off[:, h:h + 1], torch.zeros(1, dtype=torch.int64), seq_len=n,
                             block_m=BLOCK_M, cap_s=cap_s, cap_v=vw, impl="reference") for h in range(H)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--mix", default="mixed", help=f"comma-separated, of {sorted(MIXES) + ['random']}")
    ap.add_argument("--mass", default="0.95,0.98,0.99", help="comma-separated mass targets ('' for none)")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--budgets", default="1000,6096", help="vertical,slash caps")
    ap.add_argument("--old-rule", action="store_true",
                    help="session 6's rule: every adaptive head short of its target runs the fixed-budget choice "
                         "(now only those whose caps hold less than STRUCTURE_FLOOR of the estimated mass)")
    ap.add_argument("--oracle", default="", help="comma-separated targets for the true-mass oracle (a bound)")
    ap.add_argument("--model", action="store_true",
                    help="instead of --mix: every layer of the shipped retrieval model on a multi-key prompt")
    ap.add_argument("--block-m", type=int, default=128, choices=(64, 128),
                    help="the index's query block (the op's block_m; the kernel's tiles are block_m x 64 keys)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    global BLOCK_M
    BLOCK_M = args.block_m
    bad = [m for m in args.mix.split(",") if m not in (*MIXES, "random")]
    if bad:
        ap.error(f"--mix: unknown {bad}; choose from {sorted(MIXES) + ['random']}")
    torch.manual_seed(0)
    from mif_compile.kernels import select as S

    orig_select, orig_outcome = S.vertical_slash_select, S.target_outcome

    def recording_select(*a, **kw):  # keeps the estimated kept share for the printout
        out = orig_select(*a, **kw)
        _SEEN["share"] = out[2]
        return out

    S.vertical_slash_select = recording_select
    if args.old_rule:  # session 6's rule: a head short of its target runs the fixed choice
        def old_outcome(share, mass):
            reached, _ = orig_outcome(share, mass)
            return reached, reached

        S.target_outcome = old_outcome
    if args.model:
        t0 = time.time()
        layers = model_layers(args.seq_len)
        print(f"# the shipped model's {len(layers)} layers at N={args.seq_len}: {time.time() - t0:.0f} s", flush=True)
        runs = [run_mix(f"builtin layer {li}", args, given) for li, given in enumerate(layers)]
    else:
        runs = [run_mix(mix, args) for mix in args.mix.split(",")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


def model_layers(n: int, seed: int = 0):
    """[(q, k, v, scale)] of every layer of the shipped retrieval model (mif_compile/data) on one
    multi-key prompt of n tokens (16 pairs, as ``mif-compile eval``): one dense fp32 prefill on CPU, q and
    k after RoPE, recorded by a transformers attention function that then runs SDPA."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from mif_compile.evaluate import BUILTIN, _text_for, load_model
    from mif_compile.tasks import multikey_sample

    rec = []

    def record(module, query, key, value, attention_mask, **kw):
        rec.append((query.detach(), key.detach(), value.detach(), kw.get("scaling")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("mif_record", record)
    _, fmt, tok = load_model("builtin", "cpu", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(BUILTIN, dtype=torch.float32, attn_implementation="mif_record").eval()
    ids = multikey_sample(fmt, tok.encode(_text_for(fmt, [n])), n, 16, seed).ids
    with torch.no_grad():
        model.model(input_ids=torch.tensor([ids]), use_cache=False)
    return [(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5) for q, k, v, scale in rec]


def run_mix(mix, args, given=None):
    n, H, G, D = args.seq_len, args.heads, args.kv_heads, 128
    t0 = time.time()
    if given is not None:  # a model's layer: (q, k, v, scale), no planted structure
        q, k, v, scale = given
        st = None
        H, G = q.shape[1], k.shape[1]
    else:
        q, k, v, st = structured_qkv(mix, heads=H, kv_heads=G, seq_len=n, dtype=torch.bfloat16, return_structure=True)
        scale = D ** -0.5
    rows = sample_rows(n, args.rows)
    P, O, V = exact_rows(q, k, v, rows, scale)
    print(f"# {mix} N={n} heads {H}/{G}: inputs and exact rows in {time.time() - t0:.0f} s", flush=True)
    scores = R.vertical_slash_scores(q, k, last_q=64, scale=scale)
    vb, sb = (int(x) for x in args.budgets.split(","))
    out = []
    t1 = time.time()
    idx, _ = layer_index(scores, q, k, scale, vb, sb)
    out.append(measure("fixed", idx, P, O, V, rows, n, st))
    for ms in [float(x) for x in args.mass.split(",") if x]:
        idx, info = layer_index(scores, q, k, scale, vb, sb, ms)
        row = measure(f"mass{ms}", idx, P, O, V, rows, n, st)
        row["heads_missed"], row["heads_fixed"], row["est_share"] = info["missed"], info["fixed"], info["shares"]
        print(f"{'':12s} heads short of the target: {row['heads_missed']} of {H}, running the fixed choice: "
              f"{row['heads_fixed']}; estimated kept share (lowest position) per head {row['est_share']}", flush=True)
        out.append(row)
    for tg in [float(x) for x in args.oracle.split(",") if x and st is not None]:
        out.append(measure(f"oracle{tg}", oracle_index(P, rows, st, n, tg), P, O, V, rows, n, st))
    print(f"# indexes in {time.time() - t1:.0f} s", flush=True)
    return dict(mix=mix, seq_len=n, heads=H, kv_heads=G, rows=len(rows), budgets=args.budgets, block_m=BLOCK_M,
                old_rule=args.old_rule, results=out)

if __name__ == "__main__":
    main()
