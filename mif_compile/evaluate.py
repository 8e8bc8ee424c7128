"""Accuracy of sparse prefill against dense on any HF causal LM: ``python -m mif_compile.evaluate``.

    python -m mif_compile.evaluate --model builtin --lengths 65536,131072 --out benchmarks/results/eval_x
    python -m mif_compile.evaluate --model PATH --text book.txt --lengths 65536,131072 --config plan.json

For each *run* (dense; ``ours``: the minference backend with the given plan/pattern and its default
settings, the adaptive index with ``mass=1.0``; ``ours_fixed``: the same with ``mass="fixed"``,
MInference's fixed budgets; ``ours_adaptive``: the same with another mass target; the baselines ``a_shape`` (A-shape on
every head, the static pattern) and ``block_sparse``, by default at the kept density ``ours`` measured
at each length) the same inputs go through the model and one table is printed, a row per (length, run):

- needle in a haystack: one fact at depths 0-100% of the haystack, exact match of the answer
  (also drawn as a depth x length heatmap per run, ``needle.png``);
- multi-key retrieval: ``--keys`` facts at random depths, every one queried at the end;
- perplexity of plain text at that length, and its difference to dense;
- what the backend did: the patterns of each rewritten site, the kept-key density per layer
  (``mif_compile.ops.collect_stats``), dense fallbacks, and the time of the forwards.

Answers are scored in the same forward as the prompt (teacher forcing): an answer counts when the
argmax at each of its positions is its next token, which is what greedy decoding would produce
under the same attention. ``--kv-budget B,...`` adds ``ours_kvB`` (ours with KV-cache compression
``kv_budget=B``), whose answers are scored by prefill-then-decode instead, since one forward never
reads the compressed cache: a cached prefill through the first queried key, then one decode step per
later token with its ``position_ids``; their perplexity is that of the cached prefill's logits.
``--score decode`` scores the other runs that way too. The op runs dense below ``min_seq_len``
(default 32768) and when an estimated index keeps more than ``max_density`` (0.6) of the pairs. ``--op-settings default`` keeps
these (nothing is overridden: what a user of ``torch.compile(model, backend="minference")`` gets);
``forced`` passes ``min_seq_len=0, max_density=1.0`` to see sparse behaviour at short lengths;
``auto`` (the default) is ``default`` when every length is at least 32768, else ``forced``; the
output says which. Logits come from the decoder's last hidden state through the output embedding
(models with final logit soft-capping are scored without it)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .backend import with_mass
from .config import DEFAULT_MASS, FIXED, BackendConfig, ConfigError, HeadPattern, ModelPlan, Pattern, _mass_text, check_mass
from .tasks import ByteTokenizer, HFTokenizer, SymbolFormat, TextFormat, load_text, multikey_sample, needle_sample, \
    text_window

__all__ = ["Run", "default_runs", "op_settings", "overrides", "match_budget", "load_model", "evaluate", "format_table",
           "format_markdown", "merge_results", "plot_needle", "main", "BUILTIN"]

BUILTIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "retrieval-llama")


@dataclasses.dataclass(frozen=True)
class Run:
    """One way to run the model: ``cfg=None`` is plain dense SDPA, otherwise the minference backend.

    ``match``: the name of an earlier run whose measured kept density this run matches at every
    length; ``cfg``'s default pattern (A-shape or block-sparse on every head) is then a template whose
    budget is chosen per length (:func:`match_budget`): A-shape keeps ``n_init`` and chooses
    ``n_local``, block-sparse chooses ``top_k``."""

    name: str
    cfg: BackendConfig | None = None
    match: str | None = None
    score: str = "teacher"  # "teacher": answers read off one forward; "decode": prefill, then decode steps

    def __post_init__(self):
        if self.score not in SCORES:
            raise ConfigError(f"score={self.score!r}: expected one of {', '.join(SCORES)}")
        if self.cfg is not None and self.cfg.kv_budget is not None and self.score != "decode":
            raise ConfigError(f"run {self.name!r}: kv_budget={self.cfg.kv_budget} compresses the cache, which only "
                              "decoding reads: score it with score='decode'")


SCORES = ("teacher", "decode")


OP_SETTINGS = ("auto", "default", "forced")
FORCED = {"min_seq_len": 0, "max_density": 1.0}  # what "forced" changes: the sparse path at every length


def op_settings(mode: str, lengths: Sequence[int]) -> str:
    """``default`` (the op's own settings: dense below ``min_seq_len`` 32768, dense fallback above
    ``max_density`` 0.6) or ``forced`` (min_seq_len=0, max_density=1.0: the sparse path at every
    length); ``auto``: default when every length is at least the op's ``min_seq_len``, else forced."""
    if mode not in OP_SETTINGS:
        raise ConfigError(f"--op-settings {mode!r}: expected one of {', '.join(OP_SETTINGS)}")
    if mode == "auto":
        return "default" if min(lengths) >= BackendConfig().min_seq_len else "forced"
    return mode


def default_runs(cfg: BackendConfig | None = None, *, a_shape: tuple[int, int] | None = (128, 3968),
                 block_sparse: int | None = 100, op_defaults: bool = False, adaptive: float | None = None,
                 fixed: bool = False, match: str | None = None, kv_budgets: Sequence[int] = (), score: str = "teacher") -> list[Run]:
    """dense, ours (``cfg``, default: the backend's defaults), A-shape and block-sparse everywhere.

    ``op_defaults``: the sparse runs keep ``cfg``'s ``min_seq_len`` and ``max_density`` (for
    ``BackendConfig()``: the op's defaults, nothing overridden); otherwise they run with
    min_seq_len=0, max_density=1.0. ``adaptive``: also ``ours_adaptive``, ours with the backend
    setting ``mass=adaptive``; ``fixed``: also ``ours_fixed``, ours with ``mass="fixed"`` (MInference's
    fixed budgets). Each only when it changes some head of the plan (a vertical-slash head without a
    mass setting of its own). ``match``: ``"ours"``, ``"ours_adaptive"`` or ``"ours_fixed"``: the baselines' budgets are chosen at each length to
    keep that run's measured density (``a_shape``'s ``n_init`` and the values given here are then
    the templates; see :class:`Run`). ``kv_budgets``: also ``ours_kv{B}`` per budget, ours with the
    backend setting ``kv_budget=B`` (SnapKV-style cache compression), always decode-scored.
    ``score``: how the other runs are scored (``"teacher"`` or ``"decode"``, see :func:`evaluate`)."""
    cfg = cfg or BackendConfig()
    if not op_defaults:
        cfg = dataclasses.replace(cfg, **FORCED)
    runs = [Run("dense", score=score), Run("ours", cfg, score=score)]
    for b in kv_budgets:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"--kv-budget {b!r}: expected positive integers")
        try:
            kv_cfg = dataclasses.replace(cfg, kv_budget=b)  # validated as the backend validates it
        except ConfigError as e:
            raise ConfigError(f"--kv-budget {b}: {e}") from None
        if any(r.name == f"ours_kv{b}" for r in runs):
            raise ConfigError(f"--kv-budget: {b} is given twice")
        runs.append(Run(f"ours_kv{b}", kv_cfg, score="decode"))
    heads = [cfg.plan.default] if cfg.plan.layers is None else [hp for layer in cfg.plan.layers for hp in layer]
    mine = with_mass(heads, cfg.mass)
    others = [("ours_adaptive", None if adaptive is None else check_mass(adaptive, "adaptive mass", fixed=False)),
              ("ours_fixed", FIXED if fixed else None)]
    for name, mass in others:
        if mass is not None and with_mass(heads, mass) != mine:
            runs.append(Run(name, dataclasses.replace(cfg, mass=mass), score=score))
    if match is not None and match not in {r.name for r in runs}:
        raise ConfigError(f"--match-density {match!r}: no such run (runs: {', '.join(r.name for r in runs[1:])})")
    base = dataclasses.replace(cfg, mass=DEFAULT_MASS)  # the baselines have no vertical-slash head: mass is moot
    if a_shape:
        runs.append(Run("a_shape", _uniform(base, HeadPattern.a_shape(*a_shape)), match, score))
    if block_sparse:
        runs.append(Run("block_sparse", _uniform(base, HeadPattern.block_sparse(block_sparse)), match, score))
    return runs


def _uniform(cfg: BackendConfig, head: HeadPattern) -> BackendConfig:
    """``cfg``'s settings with ``head`` on every head of every layer."""
    return dataclasses.replace(cfg, plan=ModelPlan(None, head), default_pattern=head)


def overrides(cfg: BackendConfig | None) -> dict[str, Any] | None:
    """The settings of ``cfg`` that differ from the backend's defaults (``BackendConfig()``), the
    plan and default pattern as their descriptions; ``{}``: the op runs exactly as a user's
    ``torch.compile(model, backend="minference")`` does. None for the dense run."""
    if cfg is None:
        return None
    base, out = BackendConfig(), {}
    for f in dataclasses.fields(BackendConfig):
        value = getattr(cfg, f.name)
        if value == getattr(base, f.name):
            continue
        if f.name in ("plan", "default_pattern"):
            if f.name == "plan" and cfg.plan.layers is None:
                continue  # a uniform plan is its default pattern
            value = "per-layer plan" if f.name == "plan" else value.describe()
        out[f.name] = value
    return out


# ---------------------------------------------------------------------------------------------
# baselines at a given kept density


def _density_of(head: HeadPattern, qk: Sequence[tuple], cfg: BackendConfig, impl: str) -> float:
    """Mean over ``qk`` (per layer: q [B, H, N, D], k [B, Hkv, N, D], scale) of the kept density of
    the index the op builds with ``head`` on every head."""
    from .ops import build_layer_index, encode_heads, kept_density

    out = []
    for q, k, scale in qk:
        codes, b0, b1 = encode_heads((head,) * q.shape[1])
        index = build_layer_index(q, k, None, scale, codes, b0, b1, cfg.last_q, cfg.block_m, impl)
        out.append(float(kept_density(index, q.shape[2], cfg.block_m)))
    return sum(out) / len(out)


def match_budget(template: HeadPattern, target: float, n: int, cfg: BackendConfig, *, qk: Sequence[tuple] | None = None,
                 impl: str = "reference", device="cpu") -> tuple[HeadPattern, float]:
    """The budget of ``template``'s pattern whose index keeps the share of causal pairs closest to
    ``target`` at length ``n`` (the op's own index and ``kept_density``: the pairs of the tiles the
    kernel computes, block size ``cfg.block_m``), the largest of equal density; returns (pattern,
    its density). A-shape (``n_init`` kept, ``n_local`` chosen) does not depend on
    the input; block-sparse (``top_k`` chosen) does, and is measured on ``qk``, the captured q/k of a
    calibration prefill at length ``n`` (one (q, k, scale) per layer, averaged over layers). Density
    grows with the budget, so this bisects: O(log n) index builds, each O(N) memory (block-sparse:
    the op's pooled (N/64)^2 scores)."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target density {target!r} is not in [0, 1]")
    if template.pattern is Pattern.A_SHAPE:
        n_init = template.budget[0]
        z = torch.zeros(1, 1, 1, 16, device=device).expand(1, 1, n, 16)  # read for its shape only: O(1) memory
        make, lo, hi, probe = (lambda b: HeadPattern.a_shape(n_init, b)), 1, n, [(z, z, 1.0)]
    elif template.pattern is Pattern.BLOCK_SPARSE:
        if not qk:
            raise ValueError("block-sparse density depends on the input: give the captured q/k (qk=)")
        make, lo, hi, probe = HeadPattern.block_sparse, 1, math.ceil(n / 64), qk
    else:
        raise ConfigError(f"matching a kept density is for a_shape and block_sparse baselines, not "
                          f"{template.pattern.value}")
    memo: dict[int, float] = {}

    def dens(b: int) -> float:
        if b not in memo:
            memo[b] = _density_of(make(b), probe, cfg, impl)
        return memo[b]

    a, b = lo, hi  # smallest budget reaching the target, then the closer of it and its predecessor
    while a < b:
        mid = (a + b) // 2
        if dens(mid) >= target:
            b = mid
        else:
            a = mid + 1
    best = min((c for c in (a - 1, a) if lo <= c <= hi), key=lambda c: (abs(dens(c) - target), c))
    # the largest budget of the same density (it computes the same pairs: e.g. every budget whose
    # index covers all causal tiles has density 1)
    a, b = best, hi
    while a < b:
        mid = (a + b + 1) // 2
        if dens(mid) <= dens(best) + 1e-12:
            a = mid
        else:
            b = mid - 1
    return make(a), dens(a)


def _capture_qk(model, ids: torch.Tensor, inductor: bool) -> list[tuple]:
    """Per layer (q, k, scale) of one dense prefill of ``ids`` (the search's capture backend)."""
    from .search import capture_backend, capture_qk

    torch._dynamo.reset()
    layers, heads = (model.config.num_hidden_layers, model.config.num_attention_heads)
    fn = torch.compile(model.get_decoder(), backend=capture_backend(layers, heads, inductor=inductor))
    with torch.no_grad(), capture_qk(store=True) as cap:
        fn(input_ids=ids, use_cache=False)
    torch._dynamo.reset()
    return [cap.records[i] for i in sorted(cap.records)]


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
            self.run = run = dataclasses.replace(run, cfg=cfg)
            torch._dynamo.reset()  # a fresh cache: no stale graph of another run, no recompile limit
            mif_compile.clear_reports()
            self.fn = torch.compile(decoder, backend=mif_compile.backend(run.cfg, inductor=inductor))

        import inspect

        params = inspect.signature(decoder.forward).parameters  # transformers 5.x: cache=, before: past_key_values=
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, N] -> [B, N, hidden]
        h = self.fn(input_ids=ids, use_cache=False).last_hidden_state
        self._note_report()
        return h

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor):
        """A cached prefill of ``ids`` [B, N] into a fresh ``DynamicCache`` (compressed by the
        backend when the run has ``kv_budget``); returns (hidden [B, N, D], cache)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        h = self.fn(input_ids=ids, position_ids=pos, use_cache=True, **{self.cache_arg: cache}).last_hidden_state
        self._note_report()
        return h, cache

    @torch.no_grad()
    def step(self, tok: torch.Tensor, position: int, cache) -> torch.Tensor:
        """One decode step: ``tok`` [B, 1] at sequence position ``position`` through ``cache``; the
        position is passed because a compressed cache holds fewer keys than tokens seen (the model
        would take the cache length). Returns hidden [B, 1, D]."""
        pos = torch.full_like(tok, position)
        return self.fn(input_ids=tok, position_ids=pos, use_cache=True, **{self.cache_arg: cache}).last_hidden_state

    def _note_report(self) -> None:
        if self.run.cfg is not None and self.report is None:
            import mif_compile

            reps = [r for r in mif_compile.reports() if r.rewritten]
            if not reps:
                last = mif_compile.last_report()
                raise RuntimeError(f"run {self.run.name!r}: the backend rewrote no attention site"
                                   + (f"\n{last.format()}" if last else " (no graph was compiled)"))
            self.report = reps[-1].format()

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


def _answer_positions(samples):
    """Per sample: the positions whose argmax must be the answer tokens, those tokens, and which
    answer each belongs to."""
    pos, tgt, owner = [], [], []
    for s in samples:
        p, t, o = [], [], []
        for j, (start, toks) in enumerate(s.answers):
            p += [start - 1 + i for i in range(len(toks))]
            t += toks
            o += [j] * len(toks)
        pos.append(p), tgt.append(t), owner.append(o)
    return pos, tgt, owner


def _predict_teacher(runner: _Runner, samples, device) -> list[list[int]]:
    """Per sample, the argmax at each answer position, read off one forward of the whole sequence."""
    pos, _, _ = _answer_positions(samples)
    ids = torch.tensor([s.ids for s in samples], device=device)
    h = runner.hidden(ids)
    width = max(map(len, pos))
    pad = lambda rows: [r + [r[-1]] * (width - len(r)) for r in rows]  # noqa: E731
    pred = runner.logits_at(h, torch.tensor(pad(pos), device=device)).argmax(-1).tolist()
    return [p[:len(q)] for p, q in zip(pred, pos)]


def _predict_decode(runner: _Runner, samples, device, kept: list | None = None) -> list[list[int]]:
    """Per sample, the argmax at each answer position, by prefill-then-decode: a cached prefill of
    the prompt up to and including the first answer's key token (the backend compresses the cache
    there when the run has ``kv_budget``), then every later token fed one decode step at a time
    (teacher forcing through the cache; the argmax after each queried key is its prediction). An
    answer counts only when all its tokens are right, so feeding the true tokens gives the score that
    greedy decoding gives. Samples whose first answer starts at the same position share a batch.
    ``kept``: gets (prefill length, cache keys per kv head after it) per prefill."""
    pos, _, _ = _answer_positions(samples)
    out: list[list[int] | None] = [None] * len(samples)
    groups: dict[int, list[int]] = {}
    for b, p in enumerate(pos):
        groups.setdefault(min(p) + 1, []).append(b)
    for p0, rows in groups.items():
        ids = torch.tensor([samples[b].ids for b in rows], device=device)
        last = max(max(pos[b]) for b in rows)
        h, cache = runner.prefill(ids[:, :p0])
        if kept is not None:
            kept.append((p0, int(cache.get_seq_length())))
        preds = {p0 - 1: runner.head(h[:, -1]).argmax(-1)}
        for t in range(p0, last + 1):
            preds[t] = runner.head(runner.step(ids[:, t:t + 1], t, cache)[:, -1]).argmax(-1)
        del cache
        for i, b in enumerate(rows):
            out[b] = [int(preds[p][i]) for p in pos[b]]
    return out


def _score(runner: _Runner, samples, device, kept: list | None = None) -> list[list[bool]]:
    """Per sample, per answer: exact match of every answer token (scored as the run says:
    teacher-forced in one forward, or by prefill-then-decode)."""
    _, tgt, owner = _answer_positions(samples)
    if runner.run.score == "decode":
        pred = _predict_decode(runner, samples, device, kept)
    else:
        pred = _predict_teacher(runner, samples, device)
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
    the backend's report, its settings that differ from the op's defaults, and per-length, per-layer
    kept density). A run with ``match`` gets its budget at each length from the density that the
    matched run measured there (``budget``, ``target_density`` in its rows). ``progress``: a tqdm bar
    on stderr counting the tokens fed through the model, with its rate and time left. On CPU, sparse
    runs with ``impl="auto"`` use the reference path (the op's "auto" runs dense there)."""
    from tqdm.auto import tqdm

    from .ops import collect_stats

    names = [r.name for r in runs]
    for i, r in enumerate(runs):
        if names.count(r.name) > 1:
            raise ValueError(f"two runs are named {r.name!r}")
        if r.match is not None and (r.match not in names[:i] or runs[names.index(r.match)].cfg is None):
            raise ValueError(f"run {r.name!r} matches the density of {r.match!r}, which is not an earlier sparse run")
    device = next(model.parameters()).device
    hay = tokenizer.encode(load_text(text) if text is not None else _text_for(fmt, lengths))
    depth_grid = [i / (depths - 1) for i in range(depths)] if depths > 1 else [0.5]
    res: dict[str, Any] = {"lengths": list(lengths), "depths": depth_grid, "keys": keys, "samples": samples,
                           "ppl_samples": ppl_samples, "format": fmt.name, "rows": [], "needle": {}, "runs": {},
                           "device": _device_name(device), "torch": torch.__version__, "haystack_tokens": len(hay)}
    per_run = _planned_tokens(lengths, len(depth_grid), samples, ppl_samples, tasks)
    bar = tqdm(total=per_run * len(runs), unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True,
               mininterval=2.0, file=sys.stderr)

    def mk_seed(n, k):  # the multi-key samples' seeds (the first is also the calibration input)
        return seed * 1_000_003 + n * 13 + k + 500

    for run in runs:
        t_run = time.perf_counter()
        runner = None if run.match else _Runner(model, run, inductor)
        first = run if runner is None else runner.run  # its settings as run (impl resolved for the device)
        cfg = _resolved(first.cfg, device)
        info = {"score": run.score, "sparse_settings": None if cfg is None else {
            "min_seq_len": cfg.min_seq_len, "max_density": cfg.max_density, "impl": cfg.impl, "mass": cfg.mass,
            "default_pattern": cfg.plan.default.describe(), "per_layer_plan": cfg.plan.layers is not None,
            "kv_budget": cfg.kv_budget, **({"kv_window": cfg.kv_window_used, "kv_pool": cfg.kv_pool_used}
                                           if cfg.kv_budget is not None else {})},
            "overrides": overrides(cfg), "matches": run.match, "density_per_layer": {}, "budget": {}}
        if run.match:
            info["overrides"]["default_pattern"] = f"{cfg.plan.default.pattern.value}, budget chosen per length"
        heat = [[None] * len(lengths) for _ in depth_grid]
        for li, n in enumerate(lengths):
            bsz = max(1, batch_tokens // n)
            row: dict[str, Any] = {"length": n, "run": run.name}
            if run.match:
                target = next((r for r in res["rows"] if r["run"] == run.match and r["length"] == n), {}).get("density")
                if target is None:
                    raise ValueError(f"run {run.name!r}: {run.match!r} measured no density at {n}")
                bar.set_description(f"{run.name} {n}: choosing the budget")
                template = cfg.plan.default
                qk = None
                if template.pattern is Pattern.BLOCK_SPARSE:
                    calib = (multikey_sample(fmt, hay, n, keys, mk_seed(n, 0)).ids if "multikey" in tasks
                             else text_window(fmt, hay, n, seed * 1_000_003 + n + 900))
                    qk = _capture_qk(model, torch.tensor([calib], device=device), inductor)
                head, calib_density = match_budget(template, target, n, cfg, qk=qk, impl=_index_impl(cfg, device),
                                                   device=device)
                del qk
                runner = _Runner(model, Run(run.name, _uniform(cfg, head), score=run.score), inductor)
                row["target_density"], row["calibration_density"] = target, calib_density
            bar.set_description(f"{run.name} {n}")
            row["budget"] = _budget_text(runner.run.cfg)
            info["budget"][str(n)] = row["budget"]
            times, stats, n_fwd, kept = [], [], 0, []
            row["score"] = runner.run.score
            if runner.run.cfg is not None and runner.run.cfg.kv_budget is not None:
                row["kv_budget"] = runner.run.cfg.kv_budget

            def fwd(tokens, fn, *a):
                nonlocal n_fwd
                _sync(device)
                t = time.perf_counter()
                with collect_stats() as st:
                    r = fn(*a)
                _sync(device)
                times.append(((time.perf_counter() - t), tokens // n))
                bar.update(tokens)
                stats.extend(st)
                n_fwd += 1
                return r

            if "needle" in tasks:
                items = [(d, needle_sample(fmt, hay, n, depth, seed * 1_000_003 + n * 101 + d * 7 + k))
                         for d, depth in enumerate(depth_grid) for k in range(samples)]
                hits = [[] for _ in depth_grid]
                for chunk in _batches(items, bsz):
                    for (d, _), ok in zip(chunk, fwd(n * len(chunk), _score, runner, [s for _, s in chunk], device,
                                                   kept)):
                        hits[d].append(all(ok))
                for d in range(len(depth_grid)):
                    heat[d][li] = sum(hits[d]) / len(hits[d])
                row["needle"] = sum(map(sum, hits)) / sum(map(len, hits))
            if "multikey" in tasks:
                items = [multikey_sample(fmt, hay, n, keys, mk_seed(n, k)) for k in range(samples)]
                oks = []
                for chunk in _batches(items, bsz):
                    for ok in fwd(n * len(chunk), _score, runner, chunk, device, kept):
                        oks += ok
                row["multikey"] = sum(oks) / len(oks)
            if "ppl" in tasks:
                nll, cnt = 0.0, 0
                windows = [text_window(fmt, hay, n, seed * 1_000_003 + n + k + 900) for k in range(ppl_samples)]
                for chunk in _batches(windows, bsz):
                    ids = torch.tensor(chunk, device=device)
                    # decode-scored runs: the logits of a cached prefill (the backend compresses the cache
                    # after each layer's attention; the prefill's own logits are those without compression)
                    hidden = (lambda x: runner.prefill(x)[0]) if runner.run.score == "decode" else runner.hidden
                    nll += fwd(ids.numel(), lambda x: runner.nll_sum(hidden(x), x), ids)
                    cnt += ids.shape[0] * (ids.shape[1] - 1)
                row["ppl"] = math.exp(nll / cnt)
            if kept:  # what the decode steps attended: the cache's keys per kv head after each prefill
                row["prefill_tokens"] = sum(p for p, _ in kept) / len(kept)
                row["cache_keys"] = sum(k for _, k in kept) / len(kept)
                row["cache_compressed"] = any(k < p for p, k in kept)
            if row["score"] == "decode":  # the table's budget column says how the answers were read
                row["budget"] += (f", kv_budget={row['kv_budget']}" if "kv_budget" in row else "") + (
                    f", cache {row['cache_keys']:.0f} of {row['prefill_tokens']:.0f} keys" if kept else "") + \
                    ", decode-scored"
            row["time_s"] = sum(t for t, _ in times)
            row["forwards"] = n_fwd
            # one sequence's forward: the median after the cell's first forward (which compiles or
            # recompiles and warms up the kernels), each divided by its batch size
            warm = times[1:] or times
            row["fwd_ms"] = 1e3 * statistics.median(t / b for t, b in warm)
            row["fwd_warm"] = len(times) > 1
            if stats:
                # kept density as run: a layer that fell back to dense (max_density) computed every pair
                ran = [1.0 if s["fell_back_to_dense"] else s["density"] for s in stats]
                row["density"] = sum(ran) / len(ran)
                row["fallback"] = sum(s["fell_back_to_dense"] for s in stats) / len(stats)
                if row["fallback"]:
                    row["density_estimated"] = sum(s["density"] for s in stats) / len(stats)
                per = len(stats) // max(1, n_fwd)
                if per and per * n_fwd == len(stats):
                    info["density_per_layer"][str(n)] = [
                        round(sum(ran[f * per + layer] for f in range(n_fwd)) / n_fwd, 4) for layer in range(per)]
            elif run.cfg is not None:
                row["density"], row["fallback"] = 1.0, 1.0  # the op never went sparse (below min_seq_len)
            res["rows"].append(row)
            log(_format_row(row, res["rows"]))
        info["report"] = runner.report
        info["wall_s"] = time.perf_counter() - t_run
        res["runs"][run.name] = info
        if "needle" in tasks:
            res["needle"][run.name] = heat
    bar.close()
    return res


def _resolved(cfg: BackendConfig | None, device) -> BackendConfig | None:
    """``cfg`` as :class:`_Runner` runs it (``impl="auto"`` is the reference on CPU)."""
    if cfg is not None and cfg.impl == "auto" and torch.device(device).type == "cpu":
        return dataclasses.replace(cfg, impl="reference")
    return cfg


def _index_impl(cfg: BackendConfig, device) -> str:
    return "reference" if torch.device(device).type == "cpu" else cfg.impl


def _budget_text(cfg: BackendConfig | None) -> str:
    """The pattern a run used, for the table: ``-`` (dense), its uniform pattern, or a plan."""
    if cfg is None:
        return "-"
    if cfg.plan.layers is not None:
        return f"per-layer plan, mass={_mass_text(cfg.mass)}"
    return with_mass([cfg.plan.default], cfg.mass)[0].describe()


def _text_for(fmt, lengths) -> str:
    from .tasks import default_text

    return default_text(max(4_000_000 if fmt.name == "symbol" else 0, 8 * max(lengths)))


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


# ---------------------------------------------------------------------------------------------
# output

_COLS = [("length", "length", "{:>7d}"), ("run", "run", "{:<13}"), ("needle", "needle", "{:>6.1%}"),
         ("multikey", "multikey", "{:>8.1%}"), ("ppl", "ppl", "{:>8.4f}"), ("dppl", "d_ppl", "{:>+8.4f}"),
         ("density", "density", "{:>7.3f}"), ("fallback", "fallback", "{:>8.0%}"), ("fwd_ms", "fwd_ms", "{:>8.1f}"),
         ("time_s", "time_s", "{:>7.2f}"), ("budget", "budget", "{}")]


def _width(fmt_: str) -> int:
    return len(fmt_.format(*([0] if fmt_[-2] in "df%" else [""])))


def _cell(row: dict, key: str, fmt_: str, rows: list) -> str:
    width = _width(fmt_)
    if key == "dppl":
        dense = _dense_row(row, rows)
        if dense is None or "ppl" not in row or "ppl" not in dense:
            return "-".rjust(width)
        return fmt_.format(row["ppl"] - dense["ppl"])
    if key not in row:
        return "-".rjust(width)
    return fmt_.format(row[key])


def _dense_row(row: dict, rows: list) -> dict | None:
    return next((r for r in rows if r["run"] == "dense" and r["length"] == row["length"]), None)


def _header() -> str:
    return " ".join(name.rjust(_width(f)) if key not in ("run", "budget") else name.ljust(_width(f))
                    for key, name, f in _COLS)


def _format_row(row: dict, rows: list) -> str:
    return " ".join(_cell(row, key, f, rows) for key, _, f in _COLS).rstrip()


def _sorted_rows(res: dict) -> list:
    order = list(res["runs"])
    return sorted(res["rows"], key=lambda r: (r["length"], order.index(r["run"]) if r["run"] in order else len(order)))


def format_table(res: dict) -> str:
    """The results as one text table (a row per length and run)."""
    return "\n".join([_header()] + [_format_row(r, res["rows"]) for r in _sorted_rows(res)])


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def format_markdown(res: dict) -> str:
    """The results as a markdown table (a row per length and run; budgets as used, and for runs at
    a matched density the density they were matched to), with a line saying how it was run: the
    README's tables are this output, pasted."""
    lines = ["| length | run | pattern (budget) | needle | multi-key | ppl (vs dense) | kept density | ms / forward "
             "| time s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in _sorted_rows(res):
        dense = _dense_row(r, res["rows"])
        ppl = "-" if "ppl" not in r else f"{r['ppl']:.4f}"
        if "ppl" in r and dense is not None and r is not dense and dense.get("ppl"):
            ppl += f" ({(r['ppl'] / dense['ppl'] - 1):+.2%})"
        dens = "-" if r["run"] == "dense" or "density" not in r else f"{r['density']:.3f}"
        if r.get("fallback"):
            dens += f" ({r['fallback']:.0%} dense fallback)"
        budget = r.get("budget", "-")
        if "target_density" in r:
            budget += f", at the density of {res['runs'][r['run']]['matches']} ({r['target_density']:.3f})"
        n = r["length"]
        size = f"{n // 1024}K" if n % 1024 == 0 else str(n)
        lines.append(f"| {size} | {r['run']} | {budget} | {_pct(r.get('needle'))} | {_pct(r.get('multikey'))} | {ppl} "
                     f"| {dens} | {r['fwd_ms']:.1f} | {r['time_s']:.1f} |")
    return "\n".join(lines) + "\n\n" + _how(res) + "\n"


def _how(res: dict) -> str:
    """One paragraph: device, samples, settings of the sparse runs."""
    s = (f"{res['device']}, torch {res['torch']}, {res.get('dtype', '')}; needle {len(res['depths'])} depths x "
         f"{res['samples']} sample(s), multi-key {res['keys']} keys x {res['samples']} sample(s), perplexity "
         f"{res.get('ppl_samples', '?')} window(s) of the haystack text per length. ")
    s += res.get("note", "") + ". " if res.get("note") else ""
    if any(r.get("score") == "decode" for r in res["rows"]):
        s += ("Decode-scored rows: each needle/multi-key prompt is prefilled with a cache up to and including the "
              "first queried key, the rest fed one decode step at a time through that cache (compressed where "
              "kv_budget is set), and an answer counts when the argmax after each queried key is its next token; "
              "their perplexity comes from the cached prefill's logits, which compression does not change (it "
              "acts on the cache only), and their ms / forward includes the decode steps. ")
    s += ("ms / forward: median time of one sequence's forward after the first of each cell (which compiles); "
          "time s: all forwards of the cell.")
    return s


def merge_results(parts: Sequence[dict]) -> dict:
    """One results dict from evaluations of the same runs at different lengths (e.g. a GPU job that
    runs the longest length in a separate, time-boxed call): rows, lengths and needle columns are
    concatenated, per-length entries of each run joined."""
    if not parts:
        raise ValueError("nothing to merge")
    out = json.loads(json.dumps(parts[0]))  # a deep copy
    for res in parts[1:]:
        if list(res["runs"]) != list(out["runs"]) or res["depths"] != out["depths"]:
            raise ValueError(f"cannot merge: runs {list(res['runs'])} / depths {len(res['depths'])} differ from "
                             f"{list(out['runs'])} / {len(out['depths'])}")
        dup = set(res["lengths"]) & set(out["lengths"])
        if dup:
            raise ValueError(f"cannot merge: length(s) {sorted(dup)} are in more than one result")
        out["lengths"] += res["lengths"]
        out["rows"] += res["rows"]
        for name, heat in res.get("needle", {}).items():
            for line, more in zip(out["needle"][name], heat):
                line += more
        for name, info in res["runs"].items():
            mine = out["runs"][name]
            for key in ("density_per_layer", "budget"):
                mine.setdefault(key, {}).update(info.get(key, {}))
            mine["wall_s"] = mine.get("wall_s", 0) + info.get("wall_s", 0)
    return out


def describe(res: dict) -> str:
    lines = [f"device {res['device']}, torch {res['torch']}, format {res['format']}, needle depths {len(res['depths'])} x "
             f"{res['samples']} samples, multi-key {res['keys']} keys x {res['samples']} samples"]
    for name, info in res["runs"].items():
        s = info["sparse_settings"]
        scored = "; answers decode-scored" if info.get("score") == "decode" else ""
        if s is None:
            lines.append(f"{name}: dense SDPA (the model as it is){scored}")
            continue
        ov = info.get("overrides") or {}
        shown = ", ".join(f"{k}={v}" for k, v in ov.items()) or "none: the op's defaults"
        what = (f"{s['default_pattern'].split('(')[0]} with its budget chosen at each length to keep the "
                f"kept density of {info['matches']}" if info.get("matches") else f"default pattern {s['default_pattern']}"
                f"{' + per-layer plan' if s['per_layer_plan'] else ''}")
        lines.append(f"{name}: minference backend, {what}; min_seq_len={s['min_seq_len']}, max_density={s['max_density']}, "
                     f"impl={s['impl']}" + (f", mass={_mass_text(s['mass'])}" if s.get("mass") is not None else "")
                     + (f", kv_budget={s['kv_budget']} (kv_window={s['kv_window']}, kv_pool={s['kv_pool']})"
                        if s.get("kv_budget") is not None else "")
                     + f"; settings changed from the op's defaults: {shown}{scored}; "
                       f"{info.get('wall_s', 0):.1f} s in all")
        if info.get("matches"):
            for n, b in info["budget"].items():
                lines.append(f"  budget at {n}: {b}")
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
    p.add_argument("--op-settings", default="auto", choices=OP_SETTINGS,
                   help="default: the sparse runs use the op's own settings, nothing overridden (dense below "
                        "min_seq_len 32768, dense fallback above max_density 0.6), as torch.compile(model, "
                        "backend='minference') runs; forced: min_seq_len=0, max_density=1.0, the sparse path at "
                        "every length; auto (default): 'default' when every length is >= 32768, else 'forced'")
    p.add_argument("--op-defaults", dest="op_settings", action="store_const", const="default",
                   help="the same as --op-settings default")
    p.add_argument("--adaptive", type=_mass_or_off, default=None,
                   help="also run ours_adaptive: ours with the backend setting mass=MASS, another target of the "
                        "adaptive index than the default 1.0 (default: off, not run)")
    p.add_argument("--fixed", default="on", choices=("on", "off"),
                   help="also run ours_fixed: ours with the backend setting mass='fixed', MInference's fixed "
                        "budgets (default on; not run when no head of the plan would change)")
    p.add_argument("--match-density", default="ours", choices=("ours", "ours_adaptive", "ours_fixed", "off"),
                   help="choose the baselines' budgets at each length so that they keep the kept density that "
                        "this run measured there (default ours; A-shape keeps --a-shape's n_init and chooses "
                        "n_local, block-sparse chooses top_k); off: the fixed --a-shape and --block-sparse budgets")
    p.add_argument("--a-shape", type=_pair, default=(128, 3968),
                   help="n_init,n_local of the A-shape baseline (with --match-density: n_init only)")
    p.add_argument("--block-sparse", type=number(int, 1), default=100,
                   help="top_k of the block-sparse baseline (with --match-density: not used)")
    p.add_argument("--kv-budget", type=int_list, default=[],
                   help="comma list of KV-cache budgets: also run ours_kvB per budget B, ours with the backend setting "
                        "kv_budget=B (SnapKV-style compression after prefill), its needle and multi-key answers "
                        "decode-scored through the compressed cache (see --score)")
    p.add_argument("--score", default="teacher", choices=SCORES,
                   help="how the needle and multi-key answers of dense, ours and the baselines are read: teacher "
                        "(default): in the forward of the whole sequence; decode: a cached prefill through the first "
                        "queried key, then one decode step per later token (as the ours_kv runs always are)")
    p.add_argument("--impl", default="auto", choices=("auto", "triton", "reference"))
    p.add_argument("--inductor", action="store_true", help="compile the rest of the graph with Inductor (slower start)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--batch-tokens", type=number(int, 1), default=32768,
                   help="tokens per forward (batch = this // length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for results.json, table.txt, table.md and needle.png (the heatmap needs matplotlib)")
    return p.parse_args(argv)


def _mass_or_off(text: str) -> float | None:
    if text == "off":
        return None
    try:
        return check_mass(float(text), "mass")
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"expected a mass in (0, 1] or 'off', got {text!r}") from None


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
    lengths = list(args.lengths)
    settings = op_settings(args.op_settings, lengths)
    match = None if args.match_density == "off" else args.match_density
    if match == "ours_adaptive" and args.adaptive is None:
        raise ConfigError("--match-density ours_adaptive needs the adaptive run: give --adaptive MASS")
    if match == "ours_fixed" and args.fixed == "off":
        raise ConfigError("--match-density ours_fixed needs the fixed run: give --fixed on")
    runs = default_runs(cfg, a_shape=args.a_shape if "a_shape" in base else None,
                        block_sparse=args.block_sparse if "block_sparse" in base else None,
                        op_defaults=settings == "default", adaptive=args.adaptive, fixed=args.fixed == "on",
                        match=match if base else None,
                        kv_budgets=args.kv_budget, score=args.score)
    if args.model != "builtin":
        check_model_folder(args.model)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, fmt, tok = load_model(args.model, args.device, dtype)
    try:
        cfg.plan.check_model(model)
    except ConfigError as e:
        raise ConfigError(f"--config {args.config!r} with --model {args.model!r}: {e}") from None
    if settings == "default":
        note = ("sparse runs use the op's default settings (min_seq_len=32768, max_density=0.6; nothing "
                "overridden" + (", except impl=reference on CPU" if not args.device.startswith("cuda") else "") + ")"
                + ("; lengths below 32768 run dense" if min(lengths) < 32768 else ""))
    else:
        note = ("sparse runs use min_seq_len=0 and max_density=1.0 (forced; the op's defaults 32768 and 0.6 would "
                f"run {'these lengths' if max(lengths) < 32768 else 'lengths below 32768'} dense)")
    if match and base:
        note += f"; baselines at the kept density of {match}, budget chosen per length"
    if args.kv_budget or args.score == "decode":
        decoded = [r.name for r in runs if r.score == "decode"]
        note += (f"; decode-scored (prefill through the first queried key, then decode steps): {', '.join(decoded)}"
                 + ("; ours_kvB: ours with kv_budget=B" if args.kv_budget else ""))
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
            lines = info["report"].splitlines()
            print(f"{name}: {lines[0]}")
            # KV-cache compression: what the sites did with the cache, and the kept keys of the first call
            kv = (ln.strip() for ln in lines if ln.lstrip().startswith("kv ") or "cache kept" in ln)
            for line in dict.fromkeys(kv):
                print(f"{name}:   {line}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(args.out, "table.txt"), "w") as f:
            f.write(f"model {args.model}; {note}\n{format_table(res)}\n{describe(res)}\n")
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(f"Model `{args.model}`.\n\n{format_markdown(res)}")
        written = ["results.json", "table.txt", "table.md"]
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
