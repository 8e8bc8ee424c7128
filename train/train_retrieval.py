"""Train a small byte-level Llama that retrieves across its whole context (multi-key associative recall).

    python train/train_retrieval.py --out OUT [--budget-s 420] [--stages 128:8:64,512:16:32,2048:16:16,8192:16:4]

Each sequence is real text (the Python standard library's source, ASCII bytes) with P needles
``[NEEDLE, key, value]`` hidden in it (keys and values are non-ASCII bytes, so they never occur in the
text) and, at the end, every key queried in random order: ``[QUERY, key, value]``. The loss is the
ordinary next-byte loss on the text (so attention keeps its usual sink/local structure) plus the loss
of the queried values. The layout is exactly ``mif_compile.tasks.SymbolFormat``, which the evaluation
harness uses.

The recipe (why: NOTES.md, "Training a small retrieval model"): the copy circuit forms first at short
lengths with almost no filler, so training starts at 128 tokens and moves to the next length only
when dense accuracy at the current one reaches ``--advance-acc`` (or the stage's time share runs out);
the number of needles per batch is drawn from 1..P so that single needles are seen too. A wall-clock
budget stops training in time; the weights (float16 safetensors, with config.json) and a JSON log are
always written, followed by a dense accuracy check at each evaluation length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mif_compile.tasks import KEY_BASE, N_SYMBOLS, NEEDLE, QUERY, VALUE_BASE, default_text  # noqa: E402


def text_tensor(device: str, max_chars: int = 4_000_000) -> torch.Tensor:
    """The haystack as a uint8 tensor of ASCII bytes (control bytes < 9 replaced by spaces)."""
    t = torch.frombuffer(bytearray(default_text(max_chars).encode("ascii", errors="replace")), dtype=torch.uint8)
    t = torch.where(t < 9, torch.full_like(t, 32), t)
    return t.to(device)


def make_batch(text: torch.Tensor, b: int, n: int, p: int, g: torch.Generator):
    """x: [B, N] ids; lm: [B, N-1] bool (targets that are text); ans: [B, N-1] bool (queried values)."""
    dev = text.device
    n_body = n - 3 * p
    seg = n_body // p
    assert seg >= 3, f"length {n} is too short for {p} needles"
    off = torch.randint(0, text.numel() - n, (b, 1), generator=g, device="cpu").to(dev)
    x = text[off + torch.arange(n, device=dev)].long()
    pos = torch.arange(p, device=dev) * seg + torch.randint(0, seg - 2, (b, p), generator=g, device="cpu").to(dev)
    keys = torch.rand(b, N_SYMBOLS, generator=g).argsort(-1)[:, :p].to(dev) + KEY_BASE
    vals = torch.randint(0, N_SYMBOLS, (b, p), generator=g).to(dev) + VALUE_BASE
    x.scatter_(1, pos, NEEDLE)
    x.scatter_(1, pos + 1, keys)
    x.scatter_(1, pos + 2, vals)
    perm = torch.rand(b, p, generator=g).argsort(-1).to(dev)
    tail = torch.stack([torch.full_like(keys, QUERY), keys.gather(1, perm), vals.gather(1, perm)], -1)
    x[:, n_body:] = tail.reshape(b, 3 * p)
    y = x[:, 1:]
    lm = (y < 128) & (y != NEEDLE) & (y != QUERY)
    ans = torch.zeros_like(lm)
    ans[:, n_body + 1::3] = True  # the target of each query's key position is its value
    return x, lm, ans


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.init:
        # warm start from a saved model (config.json + model.safetensors); a longer max length and,
        # optionally, a new RoPE base are written into its config (the weights do not depend on them)
        cfg = LlamaConfig.from_pretrained(args.init)
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.max_len)
        if args.rope_theta_init is not None:
            cfg.rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta_init}
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
        from safetensors.torch import load_file

        sd = load_file(os.path.join(args.init, "model.safetensors"))
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        missing = [k for k in missing if "rotary" not in k]
        if missing or unexpected:
            raise SystemExit(f"--init {args.init}: missing {missing}, unexpected {unexpected}")
        return model

    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_len,
                      rope_theta=args.rope_theta, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def losses(model, x, lm, ans, amp):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=x[:, :-1]).logits
    logits = logits.float()
    y = x[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view_as(y)
    lm_loss = (ce * lm).sum() / lm.sum().clamp(min=1)
    ans_loss = (ce * ans).sum() / ans.sum().clamp(min=1)
    acc = ((logits.argmax(-1) == y) & ans).sum() / ans.sum().clamp(min=1)
    return lm_loss, ans_loss, acc


@torch.no_grad()
def dense_accuracy(model, text, n, p, batches, batch, g, amp):
    model.eval()
    accs, lms = [], []
    for _ in range(batches):
        x, lm, ans = make_batch(text, batch, n, p, g)
        lm_loss, _, acc = losses(model, x, lm, ans, amp)
        accs.append(float(acc))
        lms.append(float(lm_loss))
    model.train()
    return sum(accs) / len(accs), sum(lms) / len(lms)


def parse_stages(spec: str):
    out = []
    for item in spec.split(","):
        n, p, b = (int(v) for v in item.split(":"))
        out.append((n, p, b))
    return out


def save(model, out_dir: str) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(os.path.join(out_dir, "config.json"))
    with open(os.path.join(out_dir, "mif_eval.json"), "w") as f:
        json.dump({"format": "symbol", "tokenizer": "bytes", "trained_length": model.config.max_position_embeddings}, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock seconds of training (eval comes after)")
    ap.add_argument("--stages", default="128:8:64,512:16:32,2048:16:16,8192:16:4",
                    help="length:max_needles:batch per curriculum stage")
    ap.add_argument("--stage-share", default="0.35,0.15,0.15",
                    help="largest share of the budget each stage but the last may take")
    ap.add_argument("--advance-acc", type=float, default=0.97)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-lengths", default="2048,4096,8192")
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--rope-theta", type=float, default=100000.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None,
                    help="warm start from this model folder (e.g. mif_compile/data/retrieval-llama or a "
                         "previous --out); the architecture options are then taken from its config")
    ap.add_argument("--rope-theta-init", type=float, default=None,
                    help="with --init: set this RoPE base in the loaded config")
    ap.add_argument("--replay", type=float, default=0.0,
                    help="share of steps that train at a random earlier stage's length (against forgetting it)")
    ap.add_argument("--save-every-s", type=float, default=120.0,
                    help="also write the weights every this many seconds, so that a cut-off run leaves a checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    dev = args.device
    amp = dev.startswith("cuda")
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
    random.seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    text = text_tensor(dev)
    model = build_model(args).to(dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    stages = parse_stages(args.stages)
    shares = [float(s) for s in args.stage_share.split(",")] if args.stage_share else []
    log = {"args": vars(args), "params": n_params, "device": torch.cuda.get_device_name() if amp else "cpu",
           "torch": torch.__version__, "stages": [], "evals": []}
    print(f"model: {n_params / 1e6:.2f}M parameters on {log['device']}; stages {stages}", flush=True)

    step, si, stage_t0 = 0, 0, time.time()
    stage_log = {"length": stages[0][0], "start_step": 0, "start_s": 0.0}
    ema = None
    last_save = time.time()
    while True:
        el = time.time() - t0
        if el > args.budget_s:
            break
        n, p_max, batch = stages[si]
        if si and random.random() < args.replay:  # replay an earlier stage, so that shorter lengths are not forgotten
            n, p_max, batch = stages[random.randrange(si)]
        frac = el / args.budget_s  # lr: warmup, constant, linear decay over the last quarter
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (1.0 if frac < 0.75 else max(0.1, (1 - frac) / 0.25))
        for grp in opt.param_groups:
            grp["lr"] = lr
        p = random.randint(1, p_max)
        x, lm, ans = make_batch(text, batch, n, p, g)
        lm_loss, ans_loss, acc = losses(model, x, lm, ans, amp)
        loss = lm_loss + ans_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        cur = (lm_loss.item(), ans_loss.item(), acc.item())
        ema = cur if ema is None else tuple(0.9 * a + 0.1 * b for a, b in zip(ema, cur))
        if time.time() - last_save > args.save_every_s:
            save(model, args.out)
            last_save = time.time()
        if step % args.eval_every == 0:
            n, p_max, batch = stages[si]
            acc_eval, lm_eval = dense_accuracy(model, text, n, p_max, 2, batch, g, amp)
            row = {"step": step, "s": round(time.time() - t0, 1), "length": n, "lr": lr, "lm_loss": round(ema[0], 4),
                   "ans_loss": round(ema[1], 4), "acc_eval": round(acc_eval, 4), "lm_eval": round(lm_eval, 4)}
            log["evals"].append(row)
            print(json.dumps(row), flush=True)
            last = si == len(stages) - 1
            over = si < len(shares) and time.time() - stage_t0 > shares[si] * args.budget_s
            if not last and (acc_eval >= args.advance_acc or over):
                stage_log.update(end_step=step, end_s=round(time.time() - t0, 1), acc=acc_eval,
                                 reason="accuracy" if acc_eval >= args.advance_acc else "time share")
                log["stages"].append(stage_log)
                si += 1
                stage_t0 = time.time()
                stage_log = {"length": stages[si][0], "start_step": step, "start_s": round(time.time() - t0, 1)}
                print(f"-> stage {si}: length {stages[si][0]}", flush=True)
    stage_log.update(end_step=step, end_s=round(time.time() - t0, 1))
    log["stages"].append(stage_log)
    log["steps"] = step
    log["train_s"] = round(time.time() - t0, 1)
    model.eval()
    save(model, args.out)
    final = {}
    for n in (int(v) for v in args.eval_lengths.split(",")):
        p_max = max(p for _, p, _ in stages)
        batch = max(1, min(8, 32768 // n))
        acc, lm_eval = dense_accuracy(model, text, n, p_max, args.eval_batches, batch, g, amp)
        final[str(n)] = {"needles": p_max, "samples": args.eval_batches * batch * p_max, "acc": round(acc, 4),
                         "lm_loss": round(lm_eval, 4)}
        print(f"dense multi-key accuracy at {n}: {acc:.4f} ({p_max} keys, lm loss {lm_eval:.3f})", flush=True)
    log["final_dense"] = final
    log["total_s"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
