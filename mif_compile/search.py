"""Offline pattern search: choose each head's pattern and budget from one calibration prefill.

1. Capture, through the backend. The model is compiled with the ``minference`` backend and a
   *capture plan* whose layer ``i`` gives every head ``A-shape(n_init=i + 1, n_local=1)``. The plan
   reaches ``torch.ops.mif.sparse_attention`` as constants, and the op's implementation looks up
   ``mif_compile.ops.run_layer`` as a module global on every call; :class:`capture_qk` swaps that
   global for a wrapper that reads the layer index back from the budgets (the same
   ``nn_module_stack`` index a real plan is applied by, whatever the call order or graph breaks),
   hands ``(layer, q, k, v, scale)`` to a callback and returns dense SDPA, so every later layer
   sees exact activations. Without layer/head counts (a model with no HF config) the plan is
   uniform and layers are numbered in call order (one call per layer per forward).
2. Recall. For each head and candidate, the candidate's index is built with the kernels the op
   uses (estimation on this very input, the fixed top-k or, for a candidate with a ``mass`` target,
   the adaptive selection of ``kernels/select.py``, then ``build_vs_index`` / ``build_bs_index``). Recall is
   the mean, over sampled query rows (the last ``n_last`` rows and ``n_spread`` rows spread over
   ``[min_row, N)``), of the dense softmax mass on the kept keys. The softmax is computed for a
   chunk of rows at a time (memory O(rows x N), never N x N); the mass of a kept 64-key block is
   two lookups in the row's prefix sums, a kept column one.
3. Cost. ``pairs`` (CPU): the (query, key) pairs the kernel computes for the head
   (``count_kept_pairs``) plus the estimation's dot products (vertical-slash: last_q x N;
   block-sparse: pooled block pairs + N), over the N(N+1)/2 pairs of dense causal attention.
   ``time`` (CUDA, kernel-aware): the measured time of estimation + index + sparse attention with
   the candidate on all heads of the layer (``triton.testing.do_bench``), split over the heads in
   proportion to their kept pairs, over the measured time of dense SDPA.
   Both are of the index itself, so an adaptive candidate is scored in the same currency as a
   fixed one: what its chosen tiles and columns keep and cost on this input.
4. Choice (:class:`Rule`): ``target`` (default) takes the cheapest candidate whose recall reaches
   ``target`` (0.95) and, when none does, the one of highest recall (``dense``, a default
   candidate of recall 1 and cost 1, thus wins whenever no sparse candidate reaching the target is
   cheaper than dense attention); ``budget`` takes the highest
   recall among candidates costing at most ``max_cost`` (a share of dense); ``tradeoff`` maximises
   ``recall - lam * cost``. The recall/cost tables are stored, so changing the rule re-chooses
   without scoring again.
5. Resume. Each finished layer is written at once to ``STATE/layer_NNN.json`` (atomically), next to
   ``STATE/meta.json`` with the settings that determine the scores. A rerun with the same settings
   skips finished layers (the prefill still runs: later layers need its activations) and runs no
   prefill at all when every layer is done.

Speed: 32 layers x 32 heads (8 kv heads, D = 128) at 32K tokens, the 13 default candidates, time
costs: 58 s on one H100 (1.5 s a layer after the first, which compiles the Triton kernels; 5 GiB peak
besides the model). Caveats: ``capture_qk`` swaps a module global, so one capture at a time per
process; scores are averaged over the batch, but one unpadded sequence is the intended input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from enum import Enum
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from . import ops
from .config import FIXED, ConfigError, HeadPattern, ModelPlan, Pattern, check_mass, save_plan

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_MASSES",
    "DEFAULT_MASS_CAPS",
    "MODES",
    "Rule",
    "CostKind",
    "SearchSettings",
    "SearchError",
    "LayerScores",
    "SearchResult",
    "capture_backend",
    "capture_qk",
    "candidate_index",
    "score_layer",
    "choose",
    "parse_candidates",
    "sample_rows",
    "choose_layer",
    "model_counts",
    "search",
]

BLOCK_N = 64
_TAG_LAYER = 1  # capture plan: n_local 1, n_init = layer + 1
_TAG_ORDER = 2  # capture plan without layer numbers: calls numbered in order
_CHUNK_ELEMS = 1 << 25  # probabilities held per chunk of sampled rows (B * H * rows * N)
STATE_FORMAT = "mif-compile-search/v1"

# Candidates for long prompts (~32K tokens): MInference's own search set plus larger and smaller tiers,
# and dense: with the rule "target", a head that no sparse candidate serves more cheaply stays dense.
# Vertical-slash candidates of mode "fixed" say mass=fixed, so that a plan means what was scored.
DEFAULT_CANDIDATES: tuple[HeadPattern, ...] = (
    HeadPattern.a_shape(128, 1024),
    HeadPattern.a_shape(128, 2048),
    HeadPattern.a_shape(128, 3968),
    HeadPattern.vertical_slash(30, 800, mass=FIXED),
    HeadPattern.vertical_slash(100, 750, mass=FIXED),
    HeadPattern.vertical_slash(500, 700, mass=FIXED),
    HeadPattern.vertical_slash(3500, 100, mass=FIXED),
    HeadPattern.vertical_slash(1000, 2000, mass=FIXED),
    HeadPattern.vertical_slash(1000, 6096, mass=FIXED),
    HeadPattern.block_sparse(16),
    HeadPattern.block_sparse(32),
    HeadPattern.block_sparse(100),
    HeadPattern.dense(),
)


# The adaptive (mass-targeted) vertical-slash candidates of mode "mass": every cap with every target.
# Columns within the cap are always kept, so the caps differ in v; s = 6096 allows 96 groups of 64 diagonals.
DEFAULT_MASSES: tuple[float, ...] = (0.9, 0.95, 0.99, 0.999)
DEFAULT_MASS_CAPS: tuple[tuple[int, int], ...] = ((30, 6096), (100, 6096), (1000, 6096))
# "fixed": vertical-slash candidates with MInference's fixed budgets (and every other pattern);
# "mass": the adaptive candidates above
MODES = ("fixed", "mass")


class SearchError(RuntimeError):
    """A search that cannot go on (state written with other settings, nothing captured, ...)."""


class Rule(str, Enum):
    TARGET = "target"
    BUDGET = "budget"
    TRADEOFF = "tradeoff"


class CostKind(str, Enum):
    AUTO = "auto"  # time on CUDA, pairs elsewhere
    PAIRS = "pairs"
    TIME = "time"


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """What is scored and how the winner is chosen (see the module docstring).

    ``modes`` says which vertical-slash candidates are scored: ``"fixed"`` the fixed-budget ones of
    ``candidates`` (MInference's mode; the other patterns of ``candidates`` are scored in every mode),
    ``"mass"`` the adaptive ones: those of ``candidates`` with a ``mass`` and every cap of
    ``mass_caps`` with every target of ``masses``. :attr:`scored` is the resulting list.
    """

    candidates: tuple[HeadPattern, ...] = DEFAULT_CANDIDATES
    rule: Rule = Rule.TARGET
    target: float = 0.95  # rule "target": recall to reach
    max_cost: float = 0.1  # rule "budget": cost limit, a share of dense
    lam: float = 1.0  # rule "tradeoff": recall - lam * cost
    n_last: int = 128  # sampled rows: the last n_last ...
    n_spread: int = 384  # ... and n_spread spread over [min_row, N)
    min_row: int | None = None  # None: N // 8
    last_q: int = 64  # vertical-slash probe, as the op's
    # query block of the scored index. The op runs 128 by default: its kept keys include those at 64
    # except a run's last-block overshoot (< 64 keys), so recall scored at 64 is about a lower bound
    block_m: int = 64
    cost: CostKind = CostKind.AUTO
    impl: str = "auto"
    modes: tuple[str, ...] = ("fixed",)
    masses: tuple[float, ...] = DEFAULT_MASSES
    mass_caps: tuple[tuple[int, int], ...] = DEFAULT_MASS_CAPS

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", Rule(self.rule))
        object.__setattr__(self, "cost", CostKind(self.cost))
        cands = tuple(self.candidates)
        for i, c in enumerate(cands):
            if not isinstance(c, HeadPattern):
                raise ConfigError(f"search: candidate {i} must be a HeadPattern, got {c!r}")
        # a vertical-slash candidate without a mass is a fixed-budget one, and the plan says so (a head
        # without a mass setting would take the backend's, the adaptive index by default)
        cands = tuple(dataclasses.replace(c, mass=FIXED) if c.pattern is Pattern.VERTICAL_SLASH and c.mass is None
                      else c for c in cands)
        if len(set(cands)) != len(cands):
            raise ConfigError(f"search: duplicate candidates in {[c.describe() for c in cands]}")
        object.__setattr__(self, "candidates", cands)
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        bad = [m for m in modes if m not in MODES]
        if bad or not modes or len(set(modes)) != len(modes):
            raise ConfigError(f"search: modes must be distinct names among {list(MODES)}, got {list(modes)}")
        object.__setattr__(self, "modes", modes)
        masses = tuple(check_mass(m, "search: mass target", fixed=False) for m in self.masses)
        if len(set(masses)) != len(masses):
            raise ConfigError(f"search: duplicate mass targets in {list(masses)}")
        object.__setattr__(self, "masses", masses)
        caps = []
        for cap in self.mass_caps:
            try:
                if len(tuple(cap)) != 2:
                    raise ConfigError("expected (v, s), two integers")
                caps.append(HeadPattern.vertical_slash(*cap).budget)
            except (ConfigError, TypeError) as e:
                raise ConfigError(f"search: mass cap {cap!r}: {e}") from None
        object.__setattr__(self, "mass_caps", tuple(caps))
        if "mass" not in modes:
            given = [c.describe() for c in cands if c.adaptive]
            if given:
                raise ConfigError(f"search: candidate(s) {given} have a mass target, but modes {list(modes)} "
                                  "leave out 'mass'")
        if "mass" in modes and not (masses and caps) and not any(c.adaptive for c in cands):
            raise ConfigError("search: mode 'mass' needs at least one mass target and one cap (or a candidate "
                              "with a mass)")
        if not self.scored:
            raise ConfigError(f"search: no candidate to score in modes {list(modes)} (candidates: "
                              f"{[c.describe() for c in cands]})")
        if not 0.0 < self.target <= 1.0:
            raise ConfigError(f"search: target recall must be in (0, 1], got {self.target}")
        if self.max_cost <= 0 or self.lam < 0:
            raise ConfigError(f"search: max_cost must be > 0 and lam >= 0, got {self.max_cost}, {self.lam}")
        if self.n_last < 0 or self.n_spread < 0 or self.n_last + self.n_spread == 0:
            raise ConfigError(f"search: sample at least one row (n_last {self.n_last}, n_spread {self.n_spread})")
        if self.block_m not in (64, 128):
            raise ConfigError(f"search: block_m must be 64 or 128, got {self.block_m}")

    @property
    def scored(self) -> tuple[HeadPattern, ...]:
        """The candidates scored for every head, in order: ``candidates`` as the modes allow, then the
        generated adaptive ones (caps x targets) that are not already there."""
        fixed, mass = "fixed" in self.modes, "mass" in self.modes
        out = [c for c in self.candidates
               if (c.adaptive and mass) or (c.fixed and fixed) or c.pattern is not Pattern.VERTICAL_SLASH]
        if mass:  # highest target first: where two targets give the same index here, the higher one wins
            for v, s in self.mass_caps:
                for m in sorted(self.masses, reverse=True):
                    hp = HeadPattern.vertical_slash(v, s, mass=m)
                    if hp not in out:
                        out.append(hp)
        return tuple(out)

    def scoring_key(self) -> dict[str, Any]:
        """The settings the stored scores depend on (the rule is applied afterwards)."""
        return {
            "candidates": [c.to_json() for c in self.scored],
            "n_last": self.n_last, "n_spread": self.n_spread, "min_row": self.min_row,
            "last_q": self.last_q, "block_m": self.block_m,
        }


def parse_candidates(specs: Iterable[str]) -> tuple[HeadPattern, ...]:
    """``["a_shape:128,3968", "vertical_slash:1000,6096", "vertical_slash:100,6096,mass=0.95",
    "block_sparse:100", "dense"]`` -> patterns (``mass=``: the adaptive index's target, or ``mass=fixed``,
    vertical-slash only; the search scores a vertical-slash candidate without one as fixed budgets)."""
    out = []
    for spec in specs:
        for item in spec.replace(";", " ").split():
            name, _, nums = item.partition(":")
            fields = nums.split(",") if nums else []
            mass = None
            try:
                keyed = [f for f in fields if "=" in f]
                budget = tuple(int(x) for x in fields if "=" not in x)
                for f in keyed:
                    key, _, value = f.partition("=")
                    if key != "mass" or mass is not None:
                        raise ConfigError(f"candidate {item!r}: unknown or repeated field {f!r}; the only named "
                                          "field is mass=, like vertical_slash:100,6096,mass=0.95")
                    mass = check_mass(value if value.strip().lower() == FIXED else float(value),
                                      f"candidate {item!r}: mass")
            except ConfigError:
                raise
            except ValueError:
                raise ConfigError(f"candidate {item!r}: budgets must be integers and mass a number, like "
                                  "vertical_slash:1000,6096 or vertical_slash:100,6096,mass=0.95") from None
            try:
                hp = HeadPattern.default_for(name)
                out.append(HeadPattern(hp.pattern, budget or hp.budget, mass=mass))
            except ConfigError as e:
                raise ConfigError(f"candidate {item!r}: {e}") from None
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# 1. capture


def model_counts(model: torch.nn.Module) -> tuple[int | None, int | None]:
    """(layers, query heads) from a Hugging Face config, else (None, None)."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    return (layers, heads) if isinstance(layers, int) and isinstance(heads, int) else (None, None)


def capture_backend(num_layers: int | None = None, num_heads: int | None = None, *, inductor: bool = False):
    """The compiler function whose op calls :class:`capture_qk` records (see the module docstring)."""
    from .backend import backend

    if num_layers is None or num_heads is None:
        plan = ModelPlan.uniform(HeadPattern.a_shape(1, _TAG_ORDER))
    else:
        plan = ModelPlan(tuple((HeadPattern.a_shape(i + 1, _TAG_LAYER),) * num_heads for i in range(num_layers)))
    return backend(plan, min_seq_len=0, max_density=1.0, inductor=inductor)


OnLayer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


class capture_qk:
    """``with capture_qk(on_layer) as cap: compiled_model(ids)``: calls ``on_layer(layer, q, k, v, scale)``
    for every op call of a :func:`capture_backend` plan (q: [B, H, N, D], k, v: [B, Hkv, N, D]) and
    returns dense attention. Calls from other plans run the real op. ``store=True`` also keeps
    ``cap.records[layer] = (q, k, scale)``; ``cap.layers`` lists the layers in call order."""

    def __init__(self, on_layer: OnLayer | None = None, *, store: bool = False):
        self.on_layer = on_layer
        self.store = store
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.layers: list[int] = []
        self._ordinal = 0

    def __enter__(self) -> "capture_qk":
        self._orig = ops.run_layer
        ops.run_layer = self._run_layer
        return self

    def __exit__(self, *exc) -> None:
        ops.run_layer = self._orig

    def _layer_of(self, patterns, budget0, budget1) -> int | None:
        if not patterns or any(c != Pattern.A_SHAPE.code for c in patterns) or len(set(budget0)) != 1:
            return None
        if all(b == _TAG_LAYER for b in budget1):
            return int(budget0[0]) - 1
        if all(b == _TAG_ORDER for b in budget1):
            self._ordinal += 1
            return self._ordinal - 1
        return None

    def _run_layer(self, q, k, v, key_padding, scale, patterns, budget0, budget1, *rest, **kw):
        layer = self._layer_of(patterns, budget0, budget1)
        if layer is None:
            return self._orig(q, k, v, key_padding, scale, patterns, budget0, budget1, *rest, **kw)
        if key_padding is not None and not bool(key_padding.all()):
            raise SearchError("the calibration prefill has padding; search one unpadded sequence")
        self.layers.append(layer)
        if self.store:
            self.records[layer] = (q.detach(), k.detach(), scale)
        if self.on_layer is not None:
            self.on_layer(layer, q.detach(), k.detach(), v.detach(), scale)
        return ops.dense_attention(q, k, v, key_padding, scale)


# ---------------------------------------------------------------------------------------------
# 2. candidates, recall and cost


def _estimate_vs(q, k, scale, last_q, impl):
    from . import kernels as K

    return K.vertical_slash_scores(q, k, last_q=last_q, scale=scale, impl=impl)


def candidate_index(q, k, cand: HeadPattern, *, scale: float, last_q: int = 64, block_m: int = 64,
                    impl: str = "auto", vs_scores=None):
    """The index the op builds when every head of the layer runs ``cand`` (None for dense); a
    candidate with a ``mass`` gets the adaptive index (``kernels/select.py``, with the op's fallback to
    the fixed choice of its caps where they hold too little of the estimated mass).

    q: [B, H, N, D], k: [B, Hkv, N, D]. ``vs_scores``: (col, diag) of ``vertical_slash_scores``,
    reused across vertical-slash candidates when given.
    """
    from .ops import build_layer_index, encode_heads, encode_mass

    if cand.pattern is Pattern.DENSE:
        return None
    heads = (cand,) * q.shape[1]
    codes, b0, b1 = encode_heads(heads)
    mass = encode_mass(heads) if cand.adaptive else None
    if cand.pattern is Pattern.VERTICAL_SLASH and vs_scores is None:
        vs_scores = _estimate_vs(q, k, scale, last_q, impl)
    return build_layer_index(q, k, None, scale, codes, b0, b1, last_q, block_m, impl, vs_scores=vs_scores,
                             mass=mass)


def _estimation_pairs(cand: HeadPattern, n: int, last_q: int) -> float:
    """Dot products of the online estimation, in units of attention pairs."""
    if cand.pattern is Pattern.VERTICAL_SLASH:
        return float(min(last_q, n) * n)
    if cand.pattern is Pattern.BLOCK_SPARSE:
        nb = math.ceil(n / BLOCK_N)
        return nb * (nb + 1) / 2 + n
    return 0.0


def sample_rows(n: int, n_last: int, n_spread: int, min_row: int | None = None) -> torch.Tensor:
    """Sorted distinct query rows: the last ``n_last`` and ``n_spread`` spread over [min_row, n)."""
    lo = min(n // 8 if min_row is None else max(0, min_row), n - 1)
    last = torch.arange(max(lo, n - n_last), n)
    spread = torch.linspace(lo, n - 1, n_spread).round().long() if n_spread else last[:0]
    return torch.unique(torch.cat([last, spread]))


def _probs_chunks(q, k, scale, rows):
    """Yield (chunk positions, p [B, H, R, N] fp32) of the dense causal softmax of the rows."""
    B, H, N, D = q.shape
    hkv = k.shape[1]
    kf = k.float()
    keys = torch.arange(N, device=q.device)
    per = max(1, _CHUNK_ELEMS // (B * H * N))
    for c0 in range(0, rows.numel(), per):
        r = rows[c0:c0 + per]
        qc = q[:, :, r].float().view(B, hkv, H // hkv, r.numel(), D)
        s = torch.einsum("bkgrd,bknd->bkgrn", qc, kf).reshape(B, H, r.numel(), N) * scale
        s.masked_fill_(keys[None, :] > r[:, None], float("-inf"))
        yield c0, torch.softmax(s, dim=-1)


def _kept_mass(p, cum, index_rows, n: int) -> torch.Tensor:
    """Mass of the kept keys per (b, h, row): blocks via prefix sums, columns via gather."""
    bc, bo, cc, ci = index_rows  # [B, H, R], [B, H, R, CAP_S], [B, H, R], [B, H, R, CAP_V]
    start = bo.long().clamp(0, n)
    end = (start + BLOCK_N).clamp(max=n)
    ok = torch.arange(bo.shape[-1], device=bo.device) < bc[..., None]
    mass = ((cum.gather(-1, end) - cum.gather(-1, start)) * ok).sum(-1)
    cok = torch.arange(ci.shape[-1], device=ci.device) < cc[..., None]
    return mass + (p.gather(-1, ci.long().clamp(min=0)).double() * cok).sum(-1)


@dataclasses.dataclass
class LayerScores:
    """Per head and candidate: recall (kept share of attention mass) and cost (share of dense)."""

    layer: int
    seq_len: int
    candidates: tuple[HeadPattern, ...]
    recall: list[list[float]]  # [H][C]
    cost: list[list[float]]  # [H][C]
    cost_kind: str
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "seq_len": self.seq_len, "cost_kind": self.cost_kind, "seconds": self.seconds,
            "candidates": [c.to_json() for c in self.candidates], "recall": self.recall, "cost": self.cost,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str) -> "LayerScores":
        try:
            cands = tuple(HeadPattern.from_json(c) for c in obj["candidates"])
            recall = [[float(x) for x in row] for row in obj["recall"]]
            cost = [[float(x) for x in row] for row in obj["cost"]]
            out = cls(int(obj["layer"]), int(obj["seq_len"]), cands, recall, cost, str(obj["cost_kind"]),
                      float(obj.get("seconds", 0.0)))
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise SearchError(f"{where}: malformed layer scores ({type(e).__name__}: {e})") from None
        for h, (r, c) in enumerate(zip(recall, cost)):
            if len(r) != len(cands) or len(c) != len(cands):
                raise SearchError(f"{where}: layer {out.layer}, head {h}: expected {len(cands)} scores, "
                                  f"got {len(r)} recall and {len(c)} cost")
        if len(recall) != len(cost):
            raise SearchError(f"{where}: layer {out.layer}: {len(recall)} heads of recall, {len(cost)} of cost")
        return out


def _bench_ms(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20))


def score_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float,
                settings: SearchSettings = SearchSettings(), *, layer: int = 0,
                bench: Callable[[Callable[[], Any]], float] | None = None) -> LayerScores:
    """Recall and cost of every candidate for every head of one layer (q: [B, H, N, D])."""
    from . import kernels as K

    t0 = time.perf_counter()
    B, H, N, _ = q.shape
    st = settings
    kind = _cost_kind(st.cost, q.is_cuda)
    if kind is CostKind.TIME and v is None:
        raise SearchError("cost 'time' needs v to run the kernels")
    bench = bench or _bench_ms
    causal = N * (N + 1) / 2
    rows = sample_rows(N, st.n_last, st.n_spread, st.min_row).to(q.device)
    qblocks, pos = torch.unique(rows // st.block_m, return_inverse=True)
    cands = st.scored
    needs_vs = any(c.pattern is Pattern.VERTICAL_SLASH for c in cands)
    vs_scores = _estimate_vs(q, k, scale, st.last_q, st.impl) if needs_vs else None

    sliced, cost = [], torch.zeros(H, len(cands), dtype=torch.float64)
    t_dense = bench(lambda: ops.dense_attention(q, k, v, None, scale)) if kind is CostKind.TIME else None
    for c, cand in enumerate(cands):
        index = candidate_index(q, k, cand, scale=scale, last_q=st.last_q, block_m=st.block_m, impl=st.impl,
                                vs_scores=vs_scores)
        if index is None:
            sliced.append(None)
            cost[:, c] = 1.0
            continue
        pairs = K.count_kept_pairs(index, N, st.block_m).double().mean(0).cpu()  # [H]
        if kind is CostKind.PAIRS:
            cost[:, c] = (pairs + _estimation_pairs(cand, N, st.last_q)) / causal
        else:
            def run(cand=cand):
                idx = candidate_index(q, k, cand, scale=scale, last_q=st.last_q, block_m=st.block_m, impl=st.impl)
                return K.sparse_attention(q, k, v, idx, scale=scale, block_m=st.block_m, impl=st.impl)

            share = pairs / pairs.sum().clamp(min=1)
            cost[:, c] = bench(run) / t_dense * H * share
        sliced.append(tuple(t[:, :, qblocks] for t in index))
        del index

    mass = torch.zeros(len(cands), B, H, dtype=torch.float64, device=q.device)
    for c0, p in _probs_chunks(q, k, scale, rows):
        r = p.shape[2]
        cum = F.pad(p.double().cumsum(-1), (1, 0))  # [B, H, R, N + 1]
        where = pos[c0:c0 + r]
        for c, idx in enumerate(sliced):
            if idx is None:
                mass[c] += p.double().sum((-1, -2))
                continue
            rows_idx = tuple(t[:, :, where] for t in idx)
            mass[c] += _kept_mass(p, cum, rows_idx, N).sum(-1)
        del cum
    recall = (mass / rows.numel()).mean(1).clamp(max=1.0).T.cpu()  # [H, C]
    return LayerScores(layer, N, cands, recall.tolist(), cost.tolist(), kind.value,
                       round(time.perf_counter() - t0, 3))


def choose(recall: Sequence[float], cost: Sequence[float], settings: SearchSettings = SearchSettings()) -> int:
    """Index of the chosen candidate for one head (see :class:`Rule`)."""
    cands = range(len(recall))
    best_recall = max(cands, key=lambda c: (recall[c], -cost[c], -c))
    rule = settings.rule
    if rule is Rule.TARGET:
        ok = [c for c in cands if recall[c] >= settings.target]
        return min(ok, key=lambda c: (cost[c], -recall[c], c)) if ok else best_recall
    if rule is Rule.BUDGET:
        ok = [c for c in cands if cost[c] <= settings.max_cost]
        return max(ok, key=lambda c: (recall[c], -cost[c], -c)) if ok else min(cands, key=lambda c: (cost[c], -recall[c], c))
    return max(cands, key=lambda c: (recall[c] - settings.lam * cost[c], recall[c], -c))


def choose_layer(scores: LayerScores, settings: SearchSettings = SearchSettings()) -> tuple[HeadPattern, ...]:
    heads = []
    for r, c in zip(scores.recall, scores.cost):
        i = choose(r, c, settings)
        cand = scores.candidates[i]
        heads.append(dataclasses.replace(cand, score=round(r[i], 4)))  # a mass target stays
    return tuple(heads)


# ---------------------------------------------------------------------------------------------
# 3. the resumable driver


class _State:
    """STATE/meta.json + STATE/layer_NNN.json; None path = in memory only."""

    def __init__(self, path: str | os.PathLike | None, meta: dict[str, Any]):
        self.path = None if path is None else os.fspath(path)
        self.layers: dict[int, LayerScores] = {}
        self.meta = meta
        if self.path is None:
            return
        os.makedirs(self.path, exist_ok=True)
        meta_path = os.path.join(self.path, "meta.json")
        if os.path.exists(meta_path):
            old = _read_json(meta_path)
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                shown = ", ".join(_change(k, old.get(k), meta.get(k)) for k in diff)
                raise SearchError(f"{self.path} holds a search with other settings ({shown}); "
                                  f"use another state directory or delete it")
            for name in sorted(os.listdir(self.path)):
                if name.startswith("layer_") and name.endswith(".json"):
                    where = os.path.join(self.path, name)
                    scores = LayerScores.from_json(_read_json(where), where)
                    if scores.candidates != tuple(HeadPattern.from_json(c) for c in meta["candidates"]):
                        raise SearchError(f"{where}: candidates differ from {meta_path}")
                    self.layers[scores.layer] = scores
        else:
            _write_json(meta_path, meta)

    def add(self, scores: LayerScores) -> None:
        self.layers[scores.layer] = scores
        if self.path is not None:
            _write_json(os.path.join(self.path, f"layer_{scores.layer:03d}.json"), scores.to_json())


def _change(key: str, old: Any, new: Any) -> str:
    if key == "candidates":
        desc = lambda cs: "[" + ", ".join(HeadPattern.from_json(c).describe() for c in cs or ()) + "]"  # noqa: E731
        return f"candidates {desc(old)} -> {desc(new)}"
    return f"{key} {old!r} -> {new!r}"


def _cost_kind(kind: CostKind, cuda: bool) -> CostKind:
    if kind is CostKind.AUTO:
        return CostKind.TIME if cuda else CostKind.PAIRS
    return kind


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SearchError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.write("\n")
    os.replace(tmp, path)


@dataclasses.dataclass
class SearchResult:
    plan: ModelPlan
    scores: dict[int, LayerScores]
    resumed: list[int]  # layers read from the state directory, not scored again
    missing: list[int]  # layers the backend left dense (not causal prefills): dense in the plan


def _progress(total: int | None, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        tqdm = None
    if tqdm is not None:
        return tqdm(total=total, initial=initial, desc="pattern search", unit="layer", file=sys.stderr,
                    disable=not enabled, dynamic_ncols=True)
    return _PlainBar(total, initial, enabled)


class _PlainBar:
    def __init__(self, total, initial, enabled):
        self.total, self.n, self.enabled = total, initial, enabled

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.enabled:
            print(f"\rpattern search: {self.n}/{self.total or '?'} layers", end="", file=sys.stderr, flush=True)

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    settings: SearchSettings = SearchSettings(),
    out: str | os.PathLike | None = None,
    state_dir: str | os.PathLike | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    forward_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_layer_done: Callable[[LayerScores], None] | None = None,
    inductor: bool = False,
    model_name: str = "",
) -> SearchResult:
    """Search every layer's head patterns on one prefill of ``input_ids`` and return (and, with
    ``out``, save) the plan. ``state_dir`` (default ``OUT.search``) makes it resumable per layer.
    Layer/head counts come from a HF config when not given."""
    if num_layers is None and num_heads is None:
        num_layers, num_heads = model_counts(model)
    if state_dir is None and out is not None:
        state_dir = os.fspath(out) + ".search"
    ids = input_ids.detach()
    meta = {
        "format": STATE_FORMAT, "model": model_name, "num_layers": num_layers, "num_heads": num_heads,
        "seq_len": int(ids.shape[-1]), "input_sha1": hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest(),
        "cost": _cost_kind(settings.cost, ids.is_cuda).value, **settings.scoring_key(),
    }
    state = _State(state_dir, meta)
    resumed = sorted(state.layers)
    bar = _progress(num_layers, len(resumed), progress)

    def on_layer(layer, q, k, v, scale):
        if layer in state.layers:
            return
        if num_heads is not None and q.shape[1] != num_heads:
            raise SearchError(f"layer {layer}: captured {q.shape[1]} query heads, the model config says {num_heads}")
        scores = score_layer(q, k, v, scale, settings, layer=layer)
        state.add(scores)
        counts: dict[str, int] = {}
        for hp in choose_layer(scores, settings):
            counts[hp.pattern.value] = counts.get(hp.pattern.value, 0) + 1
        bar.set_postfix_str(f"layer {layer}: " + " ".join(f"{n}x{p}" for p, n in counts.items()))
        bar.update(1)
        if on_layer_done is not None:
            on_layer_done(scores)

    captured: list[int] = []
    try:
        if num_layers is None or len(state.layers) < num_layers:
            from .report import reports

            before = max((r.graph_id for r in reports()), default=-1)
            compiled = torch.compile(model, backend=capture_backend(num_layers, num_heads, inductor=inductor))
            with torch.no_grad(), capture_qk(on_layer) as cap:
                compiled(ids, **dict(forward_kwargs or {}))
            captured = cap.layers
            if not captured:
                why = sorted({f"{s.module or s.node}: {s.reason}" for r in reports() if r.graph_id > before
                              for s in r.dense})
                raise SearchError("no attention layer was captured: the backend rewrote no causal-prefill SDPA"
                                  + (" (" + "; ".join(why[:4]) + ")" if why else ""))
    finally:
        bar.close()
    total = num_layers if num_layers is not None else max(state.layers) + 1
    width = num_heads or len(next(iter(state.layers.values())).recall)
    layers, missing = [], []
    for i in range(total):
        if i in state.layers:
            layers.append(choose_layer(state.layers[i], settings))
        else:
            missing.append(i)
            layers.append((HeadPattern.dense(),) * width)
    if missing:
        print(f"mif-compile search: layer(s) {missing} were not rewritten by the backend (not provable causal "
              f"prefills); they stay dense", file=sys.stderr)
    plan = ModelPlan(tuple(layers), default=HeadPattern.dense())
    if out is not None:
        save_plan(plan, out)
    return SearchResult(plan, dict(state.layers), resumed, missing)

