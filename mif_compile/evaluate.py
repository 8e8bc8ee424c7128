"""Accuracy of sparse prefill against dense on any HF causal LM: ``python -m mif_compile.evaluate``.

    python -m mif_compile.evaluate --model builtin --lengths 2048,4096,8192 --out benchmarks/results/eval_x
    python -m mif_compile.evaluate --model PATH --text book.txt --lengths 32768,65536 --config plan.json

For each *run* (dense; ``ours``: the minference backend with the given plan/pattern; the baselines
``a_shape`` (A-shape on every head, the static pattern) and ``block_sparse``) the same inputs go
through the model and one table is printed, a row per (length, run):

- needle in a haystack: one fact at depths 0-100% of the haystack, exact match of the answer
  (also drawn as a depth x length heatmap per run, ``needle.png``);
- multi-key retrieval: ``--keys`` facts at random depths, every one queried at the end;
- perplexity of plain text at that length, and its difference to dense;
- what the backend did: the patterns of each rewritten site, the kept-key density per layer
  (``mif_compile.ops.collect_stats``), dense fallbacks, and the time of the forwards.

Answers are scored in the same forward as the prompt (teacher forcing): an answer counts when the
argmax at each of its positions is its next token, which is what greedy decoding would produce
under the same attention. The op runs dense below ``min_seq_len`` (default 32768) and when an
estimated index keeps more than ``max_density`` (0.6) of the pairs; to see sparse behaviour at
the short lengths of an evaluation the sparse runs pass ``min_seq_len=0, max_density=1.0`` unless
``--op-defaults`` is given, and the output says which. Logits come from the decoder's last hidden
state through the output embedding (models with final logit soft-capping are scored without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .config import BackendConfig, ConfigError, HeadPattern, ModelPlan
from .tasks import ByteTokenizer, HFTokenizer, SymbolFormat, TextFormat, load_text, multikey_sample, needle_sample, \
    text_window

__all__ = ["Run", "default_runs", "load_model", "evaluate", "format_table", "plot_needle", "main", "BUILTIN"]

BUILTIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "retrieval-llama")


@dataclasses.dataclass(frozen=True)
class Run:
    """One way to run the model: ``cfg=None`` is plain dense SDPA, otherwise the minference backend."""

    name: str
    cfg: BackendConfig | None = None


def default_runs(cfg: BackendConfig | None = None, *, a_shape: tuple[int, int] | None = (128, 3968),
                 block_sparse: int | None = 100, op_defaults: bool = False) -> list[Run]:
    """dense, ours (``cfg``, default: the backend's defaults), A-shape and block-sparse everywhere."""
    cfg = cfg or BackendConfig()
    if not op_defaults:
        cfg = dataclasses.replace(cfg, min_seq_len=0, max_density=1.0)
    runs = [Run("dense"), Run("ours", cfg)]
    if a_shape:
        runs.append(Run("a_shape", _uniform(cfg, HeadPattern.a_shape(*a_shape))))
    if block_sparse:
        runs.append(Run("block_sparse", _uniform(cfg, HeadPattern.block_sparse(block_sparse))))
    return runs


def _uniform(cfg: BackendConfig, head: HeadPattern) -> BackendConfig:
    """``cfg``'s settings with ``head`` on every head of every layer."""
    return dataclasses.replace(cfg, plan=ModelPlan(None, head), default_pattern=head)


def load_model(spec: str, device: str, dtype: torch.dtype):
    """(model, format): ``builtin`` is the byte-level retrieval Llama shipped in ``mif_compile/data``;
    a directory with ``mif_eval.json`` uses its format; any other HF path gets its tokenizer and
    :class:`~mif_compile.tasks.TextFormat`."""
    from transformers import AutoModelForCausalLM

    path = BUILTIN if spec == "builtin" else spec
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    meta = os.path.join(path, "mif_eval.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            info = json.load(f)
        if info.get("format") != "symbol":
            raise ConfigError(f"{meta}: unknown format {info.get('format')!r}")
        return model, SymbolFormat(), ByteTokenizer()
    from transformers import AutoTokenizer

    tok = HFTokenizer(AutoTokenizer.from_pretrained(path))
    return model, TextFormat(tok), tok


# ---------------------------------------------------------------------------------------------
# running one model one way


class _Runner:
    """Hidden states of the decoder (dense, or compiled with the backend) and logits where needed."""

    def __init__(self, model, run: Run, inductor: bool):
        self.model, self.run = model, run
        decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.report = None
        if run.cfg is None:
            self.fn = decoder
        else:
            import mif_compile

            cfg = run.cfg
            if cfg.impl == "auto" and next(model.parameters()).device.type == "cpu":
                # the op runs dense SDPA on CPU under "auto"; an evaluation is about the sparse path
                cfg = dataclasses.replace(cfg, impl="reference")
            self.run = run = Run(run.name, cfg)
            torch._dynamo.reset()  # a fresh cache: no stale graph of another run, no recompile limit
            mif_compile.clear_reports()
            self.fn = torch.compile(decoder, backend=mif_compile.backend(run.cfg, inductor=inductor))

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, N] -> [B, N, hidden]
        h = self.fn(input_ids=ids, use_cache=False).last_hidden_state
        if self.run.cfg is not None and self.report is None:
            import mif_compile

            reps = [r for r in mif_compile.reports() if r.rewritten]
            if not reps:
                last = mif_compile.last_report()
                raise RuntimeError(f"run {self.run.name!r}: the backend rewrote no attention site"
                                   + (f"\n{last.format()}" if last else " (no graph was compiled)"))
            self.report = reps[-1].format()
        return h

    @torch.no_grad()
    def logits_at(self, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # h: [B, N, D], pos: [B, P] -> [B, P, V]
        sel = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
        return self.head(sel).float()

    @torch.no_grad()
    def nll_sum(self, h: torch.Tensor, ids: torch.Tensor, chunk: int = 1024) -> float:
        total = 0.0
        for s in range(0, ids.shape[1] - 1, chunk):
            e = min(ids.shape[1] - 1, s + chunk)
            logits = self.head(h[:, s:e]).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, s + 1:e + 1].reshape(-1),
                                           reduction="sum"))
        return total


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _score(runner: _Runner, samples, device) -> list[list[bool]]:
    """Per sample, per answer: exact match of every answer token."""
    ids = torch.tensor([s.ids for s in samples], device=device)
    h = runner.hidden(ids)
    pos, tgt, owner = [], [], []
    for s in samples:
        p, t, o = [], [], []
        for j, (start, toks) in enumerate(s.answers):
            p += [start - 1 + i for i in range(len(toks))]
            t += toks
            o += [j] * len(toks)
        pos.append(p), tgt.append(t), owner.append(o)
    width = max(map(len, pos))
    pad = lambda rows: [r + [r[-1]] * (width - len(r)) for r in rows]  # noqa: E731
    pred = runner.logits_at(h, torch.tensor(pad(pos), device=device)).argmax(-1).tolist()
    out = []
    for b, s in enumerate(samples):
        ok = [True] * len(s.answers)
        for i, j in enumerate(owner[b]):
            ok[j] &= pred[b][i] == tgt[b][i]
        out.append(ok)
    return out


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _planned_tokens(lengths, depth_count: int, samples: int, ppl_samples: int, tasks) -> int:
    """Tokens one run feeds through the model (the progress bar's total)."""
    seqs = (depth_count * samples if "needle" in tasks else 0) + (samples if "multikey" in tasks else 0) + \
        (ppl_samples if "ppl" in tasks else 0)
    return seqs * sum(lengths)


def evaluate(model, fmt, tokenizer, runs: Sequence[Run], lengths: Sequence[int], *, text: str | None = None,
             depths: int = 11, samples: int = 2, keys: int = 16, ppl_samples: int = 2, tasks=("needle", "multikey", "ppl"),
             batch_tokens: int = 32768, inductor: bool = False, seed: int = 0, log=print,
             progress: bool = True) -> dict[str, Any]:
    """Run every task at every length for every run on the same inputs; returns the results dict
    (``rows``: one per (length, run); ``needle``: run -> [depth][length] accuracy; ``runs``: per run
    the backend's report and per-length, per-layer kept density). ``progress``: a tqdm bar on stderr
    counting the tokens fed through the model, with its rate and time left. On CPU, sparse runs with
    ``impl="auto"`` use the reference path (the op's "auto" runs dense there)."""
    from tqdm.auto import tqdm

    from .ops import collect_stats

    device = next(model.parameters()).device
    hay = tokenizer.encode(load_text(text) if text is not None else _text_for(fmt, lengths))
    depth_grid = [i / (depths - 1) for i in range(depths)] if depths > 1 else [0.5]
    res: dict[str, Any] = {"lengths": list(lengths), "depths": depth_grid, "keys": keys, "samples": samples,
                           "format": fmt.name, "rows": [], "needle": {}, "runs": {}, "device": _device_name(device),
                           "torch": torch.__version__, "haystack_tokens": len(hay)}
    per_run = _planned_tokens(lengths, len(depth_grid), samples, ppl_samples, tasks)
    bar = tqdm(total=per_run * len(runs), unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True,
               mininterval=2.0, file=sys.stderr)
    for run in runs:
        runner = _Runner(model, run, inductor)
        run = runner.run  # its settings as run (impl resolved for the device)
        info = {"sparse_settings": None if run.cfg is None else {
            "min_seq_len": run.cfg.min_seq_len, "max_density": run.cfg.max_density, "impl": run.cfg.impl,
            "default_pattern": run.cfg.plan.default.describe(), "per_layer_plan": run.cfg.plan.layers is not None},
            "density_per_layer": {}}
        heat = [[None] * len(lengths) for _ in depth_grid]
        for li, n in enumerate(lengths):
            bar.set_description(f"{run.name} {n}")
            bsz = max(1, batch_tokens // n)
            row: dict[str, Any] = {"length": n, "run": run.name}
            times, stats, n_fwd = [], [], 0

            def fwd(tokens, fn, *a):
                nonlocal n_fwd
                _sync(device)
                t = time.perf_counter()
                with collect_stats() as st:
                    r = fn(*a)
                _sync(device)
                times.append(time.perf_counter() - t)
                bar.update(tokens)
                stats.extend(st)
                n_fwd += 1
                return r

            if "needle" in tasks:
                items = [(d, needle_sample(fmt, hay, n, depth, seed * 1_000_003 + n * 101 + d * 7 + k))
                         for d, depth in enumerate(depth_grid) for k in range(samples)]
                hits = [[] for _ in depth_grid]
                for chunk in _batches(items, bsz):
                    for (d, _), ok in zip(chunk, fwd(n * len(chunk), _score, runner, [s for _, s in chunk], device)):
                        hits[d].append(all(ok))
                for d in range(len(depth_grid)):
                    heat[d][li] = sum(hits[d]) / len(hits[d])
                row["needle"] = sum(map(sum, hits)) / sum(map(len, hits))
            if "multikey" in tasks:
                items = [multikey_sample(fmt, hay, n, keys, seed * 1_000_003 + n * 13 + k + 500) for k in range(samples)]
                oks = []
                for chunk in _batches(items, bsz):
                    for ok in fwd(n * len(chunk), _score, runner, chunk, device):
                        oks += ok
                row["multikey"] = sum(oks) / len(oks)
            if "ppl" in tasks:
                nll, cnt = 0.0, 0
                windows = [text_window(fmt, hay, n, seed * 1_000_003 + n + k + 900) for k in range(ppl_samples)]
                for chunk in _batches(windows, bsz):
                    ids = torch.tensor(chunk, device=device)
                    nll += fwd(ids.numel(), lambda x: runner.nll_sum(runner.hidden(x), x), ids)
                    cnt += ids.shape[0] * (ids.shape[1] - 1)
                row["ppl"] = math.exp(nll / cnt)
            row["time_s"] = sum(times)
            row["forwards"] = n_fwd
            if stats:
                row["density"] = sum(s["density"] for s in stats) / len(stats)
                row["fallback"] = sum(s["fell_back_to_dense"] for s in stats) / len(stats)
                per = len(stats) // max(1, n_fwd)
                if per and per * n_fwd == len(stats):
                    info["density_per_layer"][str(n)] = [
                        round(sum(stats[f * per + layer]["density"] for f in range(n_fwd)) / n_fwd, 4) for layer in range(per)]
            elif run.cfg is not None:
                row["density"], row["fallback"] = 1.0, 1.0  # the op never went sparse (below min_seq_len)
            res["rows"].append(row)
            log(_format_row(row, res["rows"]))
        info["report"] = runner.report
        res["runs"][run.name] = info
        if "needle" in tasks:
            res["needle"][run.name] = heat
    bar.close()
    return res


def _text_for(fmt, lengths) -> str:
    from .tasks import default_text

    return default_text(max(4_000_000 if fmt.name == "symbol" else 0, 8 * max(lengths)))


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


# ---------------------------------------------------------------------------------------------
# output

_COLS = [("length", "length", "{:>7d}"), ("run", "run", "{:<12}"), ("needle", "needle", "{:>6.1%}"),
         ("multikey", "multikey", "{:>8.1%}"), ("ppl", "ppl", "{:>8.4f}"), ("dppl", "d_ppl", "{:>+8.4f}"),
         ("density", "density", "{:>7.3f}"), ("fallback", "fallback", "{:>8.0%}"), ("time_s", "time_s", "{:>7.2f}")]


def _cell(row: dict, key: str, fmt_: str, rows: list) -> str:
    width = len(fmt_.format(*([0] if "d" in fmt_ or "f" in fmt_ or "%" in fmt_ else [""])))
    if key == "dppl":
        dense = next((r for r in rows if r["run"] == "dense" and r["length"] == row["length"]), None)
        if dense is None or "ppl" not in row or "ppl" not in dense:
            return "-".rjust(width)
        return fmt_.format(row["ppl"] - dense["ppl"])
    if key not in row:
        return "-".rjust(width)
    return fmt_.format(row[key])


def _header() -> str:
    return " ".join(name.rjust(len(f.format(*([0] if f[-2] in "df%" else [""])))) if key != "run" else name.ljust(12)
                    for key, name, f in _COLS)


def _format_row(row: dict, rows: list) -> str:
    return " ".join(_cell(row, key, f, rows) for key, _, f in _COLS)


def format_table(res: dict) -> str:
    """The results as one text table (a row per length and run), with the backend's reports."""
    lines = [_header()]
    for r in sorted(res["rows"], key=lambda r: (r["length"], list(res["runs"]).index(r["run"]))):
        lines.append(_format_row(r, res["rows"]))
    return "\n".join(lines)


def describe(res: dict) -> str:
    lines = [f"device {res['device']}, torch {res['torch']}, format {res['format']}, needle depths {len(res['depths'])} x "
             f"{res['samples']} samples, multi-key {res['keys']} keys x {res['samples']} samples"]
    for name, info in res["runs"].items():
        s = info["sparse_settings"]
        if s is None:
            lines.append(f"{name}: dense SDPA (the model as it is)")
            continue
        lines.append(f"{name}: minference backend, default pattern {s['default_pattern']}"
                     f"{' + per-layer plan' if s['per_layer_plan'] else ''}, min_seq_len={s['min_seq_len']}, "
                     f"max_density={s['max_density']}, impl={s['impl']}")
        for n, dens in info["density_per_layer"].items():
            lines.append(f"  kept density per layer at {n}: " + " ".join(f"{d:.3f}" for d in dens))
    return "\n".join(lines)


def plot_needle(res: dict, path: str) -> None:
    """A depth x length heatmap of needle accuracy per run (matplotlib, Agg canvas; ImportError
    without it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(res["needle"])
    fig = Figure(figsize=(3.2 * len(names) + 0.8, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    im = None
    for ax, name in zip(axes, names):
        heat = res["needle"][name]
        im = ax.imshow(heat, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_title(name)
        ax.set_xticks(range(len(res["lengths"])), [f"{n // 1024}K" if n >= 1024 else str(n) for n in res["lengths"]])
        ax.set_yticks(range(len(res["depths"])), [f"{d:.0%}" for d in res["depths"]])
        ax.set_xlabel("length")
        for i, line in enumerate(heat):
            for j, v in enumerate(line):
                ax.text(j, i, f"{v:.0%}" if v is not None else "", ha="center", va="center", fontsize=7)
    axes[0].set_ylabel("needle depth")
    fig.colorbar(im, ax=list(axes), fraction=0.02)
    fig.suptitle(f"needle in a haystack ({res['device']})")
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# command


def _pair(s: str) -> tuple[int, int]:
    from .cli import int_list

    values = int_list(s)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers like 128,3968, got {s!r}")
    return values[0], values[1]


def _parse(argv, prog: str = "python -m mif_compile.evaluate"):
    from .cli import Parser, add_debug, int_list, number, plain

    p = Parser(prog=prog, description=plain(__doc__))
    add_debug(p)
    p.add_argument("--model", default="builtin", help="an HF model path, or 'builtin' (the byte-level retrieval "
                                                      "Llama trained by train/train_retrieval.py)")
    p.add_argument("--text", help="haystack/perplexity text file (default: the Python standard library's sources)")
    p.add_argument("--lengths", type=int_list, default=[2048, 4096, 8192],
                   help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", type=number(int, 1), default=11, help="needle depths from 0%% to 100%%")
    p.add_argument("--samples", type=number(int, 1), default=2, help="samples per needle cell and multi-key length")
    p.add_argument("--keys", type=number(int, 1), default=16, help="key/value pairs of the multi-key task")
    p.add_argument("--ppl-samples", type=number(int, 1), default=2)
    p.add_argument("--tasks", default="needle,multikey,ppl")
    p.add_argument("--config", help="plan JSON for our run (ours or MInference's)")
    p.add_argument("--pattern", default=None, help="our default pattern, e.g. vertical_slash:1000,6096 "
                                                   "(default: the backend's default)")
    p.add_argument("--baselines", default="a_shape,block_sparse", help="comma list of a_shape, block_sparse, or ''")
    p.add_argument("--a-shape", type=_pair, default=(128, 3968), help="n_init,n_local of the A-shape baseline")
    p.add_argument("--block-sparse", type=number(int, 1), default=100, help="top_k of the block-sparse baseline")
    p.add_argument("--op-defaults", action="store_true",
                   help="keep the op's min_seq_len (32768) and max_density (0.6) instead of 0 and 1.0")
    p.add_argument("--impl", default="auto", choices=("auto", "triton", "reference"))
    p.add_argument("--inductor", action="store_true", help="compile the rest of the graph with Inductor (slower start)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--batch-tokens", type=number(int, 1), default=32768,
                   help="tokens per forward (batch = this // length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for results.json, table.txt and needle.png (the heatmap needs matplotlib)")
    return p.parse_args(argv)


def _pattern(spec: str) -> HeadPattern:
    name, _, budget = spec.partition(":")
    try:
        return HeadPattern(name, tuple(int(v) for v in budget.split(","))) if budget else HeadPattern.default_for(name)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"--pattern {spec!r}: {e if isinstance(e, ConfigError) else 'budgets must be integers'}"
                          " (like vertical_slash:1000,6096)") from None


def run_cli(args) -> dict:
    from .cli import check_model_folder
    from .config import as_plan

    # every option is checked before the model loads and before the dense run
    opts: dict[str, Any] = {"impl": args.impl, "plan": as_plan(args.config, "--config") if args.config else None}
    if args.pattern:
        opts["default_pattern"] = _pattern(args.pattern)
    cfg = BackendConfig.from_options(opts)
    base = set(filter(None, args.baselines.split(",")))
    unknown = base - {"a_shape", "block_sparse"}
    if unknown:
        raise ConfigError(f"--baselines: unknown {sorted(unknown)}; known: a_shape, block_sparse")
    tasks = tuple(filter(None, args.tasks.split(",")))
    if not tasks or set(tasks) - {"needle", "multikey", "ppl"}:
        raise ConfigError(f"--tasks {args.tasks!r}: expected a comma list of needle, multikey, ppl")
    if args.model != "builtin":
        check_model_folder(args.model)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, fmt, tok = load_model(args.model, args.device, dtype)
    try:
        cfg.plan.check_model(model)
    except ConfigError as e:
        raise ConfigError(f"--config {args.config!r} with --model {args.model!r}: {e}") from None
    runs = default_runs(cfg, a_shape=args.a_shape if "a_shape" in base else None,
                        block_sparse=args.block_sparse if "block_sparse" in base else None, op_defaults=args.op_defaults)
    lengths = list(args.lengths)
    note = ("sparse runs keep the op's defaults min_seq_len=32768, max_density=0.6" if args.op_defaults else
            "sparse runs use min_seq_len=0 and max_density=1.0 (not the op's defaults 32768 and 0.6, which would run "
            "these lengths dense)")
    tasks = tuple(args.tasks.split(","))
    tokens = _planned_tokens(lengths, args.depths if args.depths > 1 else 1, args.samples, args.ppl_samples, tasks)
    print(f"model {args.model} ({fmt.name} format) on {args.device} {dtype}; {note}", flush=True)
    print(f"{len(runs)} runs ({', '.join(r.name for r in runs)}) x {tokens:,} tokens each; progress and time left "
          "on stderr", flush=True)
    from tqdm.auto import tqdm

    print(_header(), flush=True)
    res = evaluate(model, fmt, tok, runs, lengths, text=args.text, depths=args.depths, samples=args.samples,
                   keys=args.keys, ppl_samples=args.ppl_samples, tasks=tasks, batch_tokens=args.batch_tokens,
                   inductor=args.inductor, seed=args.seed, log=lambda line: tqdm.write(line, file=sys.stdout))
    res.update(model=args.model, note=note, dtype=str(dtype))
    print("\n" + describe(res))  # the table's rows were printed as they finished
    for name, info in res["runs"].items():
        if info["report"]:
            print(f"{name}: {info['report'].splitlines()[0]}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(args.out, "table.txt"), "w") as f:
            f.write(f"model {args.model}; {note}\n{format_table(res)}\n{describe(res)}\n")
        written = ["results.json", "table.txt"]
        if "needle" in tasks:
            try:
                plot_needle(res, os.path.join(args.out, "needle.png"))
                written.append("needle.png")
            except ImportError:
                print("needle.png not drawn: it needs matplotlib (pip install matplotlib)", flush=True)
        print(f"wrote {', '.join(written)} to {args.out}", flush=True)
    return res


def main(argv: list[str] | None = None, prog: str = "python -m mif_compile.evaluate") -> int:
    from .cli import run_command

    try:
        args = _parse(argv, prog)
    except SystemExit as e:  # --help, or a one-line argument error
        return int(e.code or 0)
    return run_command(prog, lambda: run_cli(args), args.debug, (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
