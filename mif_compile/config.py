"""Head patterns, per-layer plans and backend settings.

A *plan* says, for every attention layer and every query head, which MInference pattern runs and with
which budget. Patterns and budgets are chosen offline (see ``mif_compile.search``); positions are
estimated online per input by the op. Everything here is a frozen dataclass so that a plan can be
hashed, compared and baked into a compiled graph as constants.

Files: our JSON (``{"format": "mif-compile/v1", "default": ..., "layers": [[head, ...], ...]}``) and
MInference's per-head JSON (a list with one dict per layer, ``head -> [pattern, v, s, score]``,
where ``"stream_llm"`` means A-shape with ``(n_init, n_local)``); :func:`load_plan` tells them apart
by shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from enum import Enum
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "Pattern",
    "HeadPattern",
    "ModelPlan",
    "BackendConfig",
    "ConfigError",
    "FIXED",
    "as_plan",
    "load_plan",
    "model_counts",
    "save_plan",
]

FORMAT = "mif-compile/v1"
FIXED = "fixed"  # the mass setting of MInference's fixed budgets (exactly the top v columns and s diagonals)
# The backend's default mass target: the adaptive index keeping every candidate within the caps
# (README, "Which index is the default"; benchmarks/results/bench_structured_h200_s7.json, eval_long_h200_s7.json).
DEFAULT_MASS: float | str = 1.0


class ConfigError(ValueError):
    """A plan or setting that cannot be used; the message names the layer, head and value."""


class Pattern(str, Enum):
    A_SHAPE = "a_shape"
    VERTICAL_SLASH = "vertical_slash"
    BLOCK_SPARSE = "block_sparse"
    DENSE = "dense"

    @property
    def code(self) -> int:
        """Integer id carried in the custom op's ``patterns`` list."""
        return _CODES[self]


_CODES = {Pattern.DENSE: 0, Pattern.A_SHAPE: 1, Pattern.VERTICAL_SLASH: 2, Pattern.BLOCK_SPARSE: 3}
PATTERN_FROM_CODE = {code: p for p, code in _CODES.items()}

# Budget names per pattern, in order (MInference's defaults from the paper).
BUDGET_NAMES: dict[Pattern, tuple[str, ...]] = {
    Pattern.A_SHAPE: ("n_init", "n_local"),
    Pattern.VERTICAL_SLASH: ("v", "s"),
    Pattern.BLOCK_SPARSE: ("top_k",),
    Pattern.DENSE: (),
}
DEFAULT_BUDGETS: dict[Pattern, tuple[int, ...]] = {
    Pattern.A_SHAPE: (128, 3968),
    Pattern.VERTICAL_SLASH: (1000, 6096),
    Pattern.BLOCK_SPARSE: (100,),
    Pattern.DENSE: (),
}

_MINFERENCE_NAMES = {
    "vertical_and_slash": Pattern.VERTICAL_SLASH,
    "stream_llm": Pattern.A_SHAPE,
    "block_sparse": Pattern.BLOCK_SPARSE,
    "dense": Pattern.DENSE,
}


def _where(layer: int | None, head: int | None) -> str:
    parts = []
    if layer is not None:
        parts.append(f"layer {layer}")
    if head is not None:
        parts.append(f"head {head}")
    return (", ".join(parts) + ": ") if parts else ""


@dataclasses.dataclass(frozen=True)
class HeadPattern:
    """One head's pattern and budget, e.g. ``HeadPattern.vertical_slash(1000, 6096)``.

    ``budget`` holds the pattern's sizes in the order of ``BUDGET_NAMES``: A-shape ``(n_init,
    n_local)``, vertical-slash ``(v, s)`` (kept columns, kept diagonals), block-sparse ``(top_k,)``
    (64-token key blocks per 64-token query block), dense ``()``.

    ``mass`` (vertical-slash only): the adaptive mode's target share of the estimated attention mass
    per head and input; ``(v, s)`` are then caps (at most ``v`` columns and ``ceil(s / 64)`` groups of
    64 diagonals). ``"fixed"`` (:data:`FIXED`): MInference's fixed budgets, exactly the top ``v``
    columns and top ``s`` diagonals (what MInference's plan files mean). None: inherit the backend's
    ``mass`` setting (default 1.0, the adaptive index).
    """

    pattern: Pattern
    budget: tuple[int, ...] = ()
    score: float | None = None  # recall measured by the search, informational only
    mass: float | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", _parse_pattern(self.pattern))
        if not isinstance(self.budget, (tuple, list)):
            raise ConfigError(
                f"{self.pattern.value} budget must be a sequence {BUDGET_NAMES[self.pattern]}, got {self.budget!r}"
            )
        object.__setattr__(self, "budget", tuple(self.budget))
        self.validate()
        if self.mass is not None:
            object.__setattr__(self, "mass", check_mass(self.mass))

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def a_shape(cls, n_init: int = 128, n_local: int = 3968) -> "HeadPattern":
        return cls(Pattern.A_SHAPE, (n_init, n_local))

    @classmethod
    def vertical_slash(cls, v: int = 1000, s: int = 6096, mass: float | str | None = None) -> "HeadPattern":
        return cls(Pattern.VERTICAL_SLASH, (v, s), mass=mass)

    @property
    def adaptive(self) -> bool:
        """A vertical-slash head with a mass target of its own (the adaptive index)."""
        return isinstance(self.mass, float)

    @property
    def fixed(self) -> bool:
        """A vertical-slash head set to MInference's fixed budgets (``mass="fixed"``)."""
        return self.mass == FIXED

    @classmethod
    def block_sparse(cls, top_k: int = 100) -> "HeadPattern":
        return cls(Pattern.BLOCK_SPARSE, (top_k,))

    @classmethod
    def dense(cls) -> "HeadPattern":
        return cls(Pattern.DENSE, ())

    @classmethod
    def default_for(cls, pattern: Pattern | str) -> "HeadPattern":
        p = _parse_pattern(pattern)
        return cls(p, DEFAULT_BUDGETS[p])

    # -- checks and conversion -----------------------------------------------------------------
    def validate(self, layer: int | None = None, head: int | None = None) -> None:
        names = BUDGET_NAMES[self.pattern]
        where = _where(layer, head)
        if len(self.budget) != len(names):
            raise ConfigError(
                f"{where}pattern {self.pattern.value!r} takes {len(names)} budget value(s) "
                f"{names}, got {list(self.budget)!r}"
            )
        for name, value in zip(names, self.budget):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(
                    f"{where}{self.pattern.value} budget {name} must be an integer, got {value!r}"
                )
            if value <= 0:
                raise ConfigError(
                    f"{where}{self.pattern.value} budget {name} must be positive, got {value}"
                )
        if self.mass is not None:
            if self.pattern is not Pattern.VERTICAL_SLASH:
                raise ConfigError(f"{where}mass applies to vertical_slash heads only, not {self.pattern.value!r}")
            check_mass(self.mass, f"{where}vertical_slash mass")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pattern": self.pattern.value}
        out.update(zip(BUDGET_NAMES[self.pattern], self.budget))
        if self.score is not None:
            out["score"] = self.score
        if self.mass is not None:
            out["mass"] = self.mass
        return out

    @classmethod
    def from_json(cls, obj: Any, layer: int | None = None, head: int | None = None) -> "HeadPattern":
        where = _where(layer, head)
        if isinstance(obj, str):
            return cls.default_for(_parse_pattern(obj, where))
        if not isinstance(obj, Mapping) or "pattern" not in obj:
            raise ConfigError(f"{where}expected a head entry like {{'pattern': 'vertical_slash', 'v': 1000, 's': 6096}}, got {obj!r}")
        pattern = _parse_pattern(obj["pattern"], where)
        names = BUDGET_NAMES[pattern]
        unknown = set(obj) - {"pattern", "score", *names, *(("mass",) if pattern is Pattern.VERTICAL_SLASH else ())}
        if unknown:
            raise ConfigError(f"{where}unknown key(s) {sorted(unknown)} for pattern {pattern.value!r} (takes {names})")
        budget = tuple(obj.get(n, d) for n, d in zip(names, DEFAULT_BUDGETS[pattern]))
        try:
            return cls(pattern, budget, obj.get("score"), obj.get("mass"))
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None

    def describe(self) -> str:
        if not self.budget:
            return self.pattern.value
        parts = [f"{n}={v}" for n, v in zip(BUDGET_NAMES[self.pattern], self.budget)]
        if self.mass is not None:
            parts.append(f"mass={_mass_text(self.mass)}")
        return f"{self.pattern.value}(" + ", ".join(parts) + ")"


def _mass_text(mass: float | str) -> str:
    return mass if isinstance(mass, str) else f"{mass:g}"


def check_mass(value: Any, name: str = "mass", *, fixed: bool = True) -> float | str:
    """A mass setting: a target in (0, 1], or (when ``fixed``) ``"fixed"``, MInference's fixed budgets."""
    if fixed and isinstance(value, str) and value.strip().lower() == FIXED:
        return FIXED
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        also = " or 'fixed' (MInference's fixed budgets)" if fixed else ""
        raise ConfigError(f"{name} must be a number in (0, 1]{also}, got {value!r}")
    return float(value)


def _parse_pattern(value: Any, where: str = "") -> Pattern:
    if isinstance(value, Pattern):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _MINFERENCE_NAMES:
            return _MINFERENCE_NAMES[key]
        try:
            return Pattern(key)
        except ValueError:
            pass
    known = [p.value for p in Pattern]
    raise ConfigError(f"{where}unknown pattern {value!r}; known patterns: {known}")


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """Per-layer, per-head patterns. ``layers=None`` means: every head gets ``default``.

    A per-layer plan must give every layer and head of the model (``heads_for``, ``check_model``);
    its ``default`` is never consulted for heads and is dense unless given, which is also what a
    MInference file (whose format has no default) reads back as.
    """

    layers: tuple[tuple[HeadPattern, ...], ...] | None = None
    default: HeadPattern = None  # type: ignore[assignment]  # None: vertical_slash() if uniform, else dense()

    def __post_init__(self) -> None:
        if self.default is None:
            object.__setattr__(self, "default", HeadPattern.vertical_slash() if self.layers is None else HeadPattern.dense())
        elif not isinstance(self.default, HeadPattern):
            raise ConfigError(f"default: expected a HeadPattern, got {self.default!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(tuple(layer) for layer in self.layers))
            for i, layer in enumerate(self.layers):
                for h, hp in enumerate(layer):
                    if not isinstance(hp, HeadPattern):
                        raise ConfigError(f"{_where(i, h)}expected a HeadPattern, got {hp!r}")
                    hp.validate(i, h)

    @classmethod
    def uniform(cls, pattern: HeadPattern) -> "ModelPlan":
        return cls(None, pattern)

    @property
    def num_layers(self) -> int | None:
        return None if self.layers is None else len(self.layers)

    def heads_for(self, layer: int, num_heads: int) -> tuple[HeadPattern, ...]:
        """The plan of one layer, checked against the graph's head count."""
        if self.layers is None:
            return (self.default,) * num_heads
        if not 0 <= layer < len(self.layers):
            raise ConfigError(
                f"layer {layer}: the plan has {len(self.layers)} layers, but the model has a layer {layer}"
            )
        heads = self.layers[layer]
        if len(heads) != num_heads:
            raise ConfigError(
                f"layer {layer}: the plan gives {len(heads)} heads, but the model's attention has {num_heads} query heads"
            )
        return heads

    def check_model(self, model: Any) -> None:
        """Raise :class:`ConfigError` unless this per-layer plan has exactly the layers and query heads
        of ``model`` (a Hugging Face model or its config: ``num_hidden_layers``,
        ``num_attention_heads``). A uniform plan fits every model. The backend sees one graph at a
        time and can only check the layers that graph holds; this checks the whole plan at once."""
        if self.layers is None:
            return
        num_layers, num_heads = model_counts(model)
        if num_layers is None:
            raise ConfigError(f"cannot check the plan against {type(model).__name__}: it has no config with "
                              "num_hidden_layers and num_attention_heads (a Hugging Face model has)")
        if len(self.layers) != num_layers:
            raise ConfigError(f"the plan has {len(self.layers)} layers, but the model has {num_layers} "
                              "(num_hidden_layers): a plan for another model?")
        for i, heads in enumerate(self.layers):
            if len(heads) != num_heads:
                raise ConfigError(f"layer {i}: the plan gives {len(heads)} heads, but the model has {num_heads} "
                                  "query heads (num_attention_heads): a plan for another model?")

    def score_name(self) -> str | None:
        """What the heads' ``score`` values are: "recall" when every one lies in [0, 1] (our search
        writes the kept share of the attention mass), "score" when some do not (MInference's files
        hold raw search scores in some models, e.g. 336 or 12982), None when the plan has none."""
        values = [hp.score for layer in self.layers or () for hp in layer if hp.score is not None]
        if not values:
            return None
        return "recall" if all(0.0 <= v <= 1.0 for v in values) else "score"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "default": self.default.to_json(),
            "layers": None if self.layers is None else [[hp.to_json() for hp in layer] for layer in self.layers],
        }

    def to_minference_json(self) -> list[dict[str, list]]:
        """MInference's per-head format: one dict per layer, head -> [pattern, v, s, score]."""
        if self.layers is None:
            raise ConfigError("a uniform plan has no layers to export; build one with explicit layers")
        names = {v: k for k, v in _MINFERENCE_NAMES.items()}
        out = []
        for layer in self.layers:
            d = {}
            for h, hp in enumerate(layer):
                if hp.adaptive:
                    n = self.count_mass()
                    raise ConfigError(f"{_where(len(out), h)}MInference's format has no mass target "
                                      f"({hp.describe()}; {n} head(s) of the plan have one): keep this plan in "
                                      "our format, or drop the targets explicitly (ModelPlan.without_mass(), "
                                      "mif-compile convert --drop-mass): those heads then run their caps as "
                                      "MInference's fixed budgets")
                b = list(hp.budget) + [0] * (2 - len(hp.budget))
                d[str(h)] = [names[hp.pattern], b[0], b[1], hp.score]
            out.append(d)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> "ModelPlan":
        if isinstance(obj, list):
            return cls._from_minference(obj)
        if not isinstance(obj, Mapping):
            raise ConfigError(f"a plan must be a JSON object (ours) or a list (MInference's), got {type(obj).__name__}")
        fmt = obj.get("format", FORMAT)
        if fmt != FORMAT:
            raise ConfigError(f"unknown plan format {fmt!r}; expected {FORMAT!r}")
        default = HeadPattern.from_json(obj["default"]) if "default" in obj else None
        layers_obj = obj.get("layers")
        if layers_obj is None:
            return cls(None, default)
        if not isinstance(layers_obj, list):
            raise ConfigError(f"'layers' must be a list of layers, got {type(layers_obj).__name__}")
        layers = []
        for i, layer in enumerate(layers_obj):
            if not isinstance(layer, list):
                raise ConfigError(f"layer {i}: expected a list of heads, got {type(layer).__name__}")
            layers.append(tuple(HeadPattern.from_json(h, i, j) for j, h in enumerate(layer)))
        return cls(tuple(layers), default)

    @classmethod
    def _from_minference(cls, obj: list) -> "ModelPlan":
        layers = []
        for i, layer in enumerate(obj):
            if not isinstance(layer, Mapping):
                raise ConfigError(f"layer {i}: MInference configs hold one dict per layer, got {type(layer).__name__}")
            try:
                idx = sorted(int(k) for k in layer)
            except ValueError:
                raise ConfigError(f"layer {i}: head keys must be integers, got {sorted(layer)}") from None
            if idx != list(range(len(idx))):
                raise ConfigError(f"layer {i}: heads must be numbered 0..{len(idx) - 1}, got {idx}")
            heads = []
            for h in idx:
                entry = layer[str(h)] if str(h) in layer else layer[h]
                if not isinstance(entry, (list, tuple)) or len(entry) < 3:
                    raise ConfigError(f"layer {i}, head {h}: expected [pattern, v, s, score], got {entry!r}")
                pattern = _parse_pattern(entry[0], _where(i, h))
                v, s = entry[1], entry[2]
                budget = {
                    Pattern.VERTICAL_SLASH: (v, s),
                    Pattern.A_SHAPE: (v, s),
                    Pattern.BLOCK_SPARSE: (v,),
                    Pattern.DENSE: (),
                }[pattern]
                if any(isinstance(b, float) and b.is_integer() for b in budget):
                    budget = tuple(int(b) if isinstance(b, float) and b.is_integer() else b for b in budget)
                score = float(entry[3]) if len(entry) > 3 and isinstance(entry[3], (int, float)) else None
                try:  # MInference's vertical-slash budgets are fixed ones, whatever the backend's mass
                    heads.append(HeadPattern(pattern, budget, score,
                                             FIXED if pattern is Pattern.VERTICAL_SLASH else None))
                except ConfigError as e:
                    raise ConfigError(f"{_where(i, h)}{e}") from None
            layers.append(tuple(heads))
        return cls(tuple(layers))

    def count_mass(self) -> int:
        """Heads with a mass target of their own (the adaptive index), the default's included for a
        uniform plan."""
        if self.layers is None:
            return int(self.default.adaptive)
        return sum(hp.adaptive for layer in self.layers for hp in layer)

    def without_mass(self) -> "ModelPlan":
        """The same plan with every vertical-slash head set to MInference's fixed budgets (``mass="fixed"``,
        what MInference's format can say): their ``(v, s)`` caps become the budgets."""
        strip = lambda hp: dataclasses.replace(hp, mass=FIXED) if hp.pattern is Pattern.VERTICAL_SLASH else hp  # noqa: E731
        layers = None if self.layers is None else tuple(tuple(strip(hp) for hp in layer) for layer in self.layers)
        return ModelPlan(layers, strip(self.default))

    def summary(self) -> str:
        """One line per layer: pattern counts and budgets."""
        if self.layers is None:
            return f"every head: {self.default.describe()}"
        lines = []
        for i, layer in enumerate(self.layers):
            counts: dict[str, int] = {}
            for hp in layer:
                counts[hp.describe()] = counts.get(hp.describe(), 0) + 1
            lines.append(f"layer {i:3d}: " + ", ".join(f"{n} x {d}" for d, n in counts.items()))
        return "\n".join(lines)


def model_counts(model: Any) -> tuple[int | None, int | None]:
    """(layers, query heads) of a Hugging Face model or config (its text config for a multimodal
    one), else (None, None)."""
    cfg = getattr(model, "config", model)
    text = getattr(cfg, "get_text_config", None)
    if callable(text):
        cfg = text()
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (layers, heads))
    return (layers, heads) if ok else (None, None)


def _read_plan(path: str | os.PathLike) -> ModelPlan:
    """:func:`load_plan` with messages that do not repeat the path (the caller names it)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read plan file: {e.strerror}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    return ModelPlan.from_json(obj)


def load_plan(path: str | os.PathLike) -> ModelPlan:
    """Read our JSON or MInference's per-head JSON (told apart by shape)."""
    try:
        return _read_plan(path)
    except ConfigError as e:
        raise ConfigError(f"{os.fspath(path)}: {e}") from None


def save_plan(plan: ModelPlan, path: str | os.PathLike, *, minference_format: bool = False) -> None:
    obj = plan.to_minference_json() if minference_format else plan.to_json()
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """Settings of the ``minference`` backend (also accepted as ``options=`` of torch.compile).

    - ``plan``: a :class:`ModelPlan`, a path to a plan JSON, or None (``default_pattern`` everywhere).
    - ``min_seq_len``: below this prefill length the op runs dense SDPA, the original computation.
      Default 32768: on an H100 the whole sparse op (default budgets) first beats cuDNN at 28K
      (benchmarks/NOTES.md); 32K leaves a 1.4x margin.
    - ``default_pattern``: the pattern of every head when there is no per-layer plan (a per-layer
      plan gives every head of every layer itself).
    - ``last_q``: queries used by the vertical-slash estimation (MInference: 64).
    - ``block_m``: query block of the sparse index and kernel (64 or 128).
    - ``impl``: "auto" (Triton on CUDA, reference elsewhere), "triton" or "reference".
    - ``max_density``: when an estimated index keeps more than this share of the causal pairs, the
      layer runs dense SDPA instead (dense kernels are faster per pair). Reading the share costs one
      small device-to-host copy per layer; it is skipped while a CUDA graph is being captured.
      1.0 disables the check.
    - ``mass``: the adaptive index's target share of each vertical-slash head's estimated attention
      mass, a number in (0, 1]; the head's ``(v, s)`` budgets are then caps. Default 1.0: every
      candidate within the caps that the estimate gives mass, counted in the kernel's tiles (README,
      "Which index is the default"). ``"fixed"``: MInference's fixed budgets, exactly the top ``v``
      columns and ``s`` diagonals. Heads with their own ``HeadPattern.mass`` keep theirs (a
      MInference plan file's heads are fixed).
    - ``kv_budget``: SnapKV-style KV-cache compression after each layer's prefill (off when None):
      the cache keeps, per kv head and batch row, this many keys (the observation window included;
      a left-padded row's pads on top, see ``kernels/snapkv.py``). Only for caches that grow by
      ``torch.cat`` (``DynamicCache``); see README, "KV-cache compression".
    - ``kv_window``: the observation window, the last queries whose votes choose the keys (always
      kept); at most ``last_q``. None: ``last_q``, whose votes the estimation already computes.
    - ``kv_pool``: odd kernel of the 1-D max-pooling of the votes. None: 7 (SnapKV's).
    """

    plan: ModelPlan = dataclasses.field(default_factory=ModelPlan)
    min_seq_len: int = 32768
    default_pattern: HeadPattern | None = None
    last_q: int = 64
    block_m: int = 128
    impl: str = "auto"
    max_density: float = 0.6
    mass: float | str = DEFAULT_MASS
    kv_budget: int | None = None
    kv_window: int | None = None
    kv_pool: int | None = None

    def __post_init__(self) -> None:
        plan = as_plan(self.plan, "plan")
        dp = self.default_pattern
        if dp is not None:
            try:
                if isinstance(dp, (str, Pattern)):
                    dp = HeadPattern.default_for(dp)
                elif isinstance(dp, Mapping):
                    dp = HeadPattern.from_json(dp)
                elif not isinstance(dp, HeadPattern):
                    raise ConfigError("expected a HeadPattern, a pattern name or a head entry like "
                                      "{'pattern': 'a_shape', 'n_init': 128, 'n_local': 3968}")
            except ConfigError as e:
                raise ConfigError(f"default_pattern={dp!r}: {e}") from None
            plan = ModelPlan(plan.layers, dp)
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "default_pattern", plan.default)
        for name in ("min_seq_len", "last_q", "block_m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "min_seq_len" else 1):
                kind = "non-negative" if name == "min_seq_len" else "positive"
                raise ConfigError(f"{name}={value!r}: must be a {kind} integer")
        if isinstance(self.max_density, bool) or not isinstance(self.max_density, (int, float)) or not 0.0 < self.max_density <= 1.0:
            raise ConfigError(f"max_density={self.max_density!r}: must be a number in (0, 1] (1.0 disables the check)")
        object.__setattr__(self, "max_density", float(self.max_density))
        object.__setattr__(self, "mass", check_mass(self.mass, f"mass={self.mass!r}:"))
        if self.block_m not in (64, 128):
            raise ConfigError(f"block_m={self.block_m!r}: must be 64 or 128")
        if self.impl not in ("auto", "triton", "reference"):
            raise ConfigError(f"impl={self.impl!r}: must be 'auto', 'triton' or 'reference'")
        self._check_kv()

    def _check_kv(self) -> None:
        def positive_int(name: str) -> int | None:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r}: must be a positive integer or None")
            return value

        budget, window, pool = positive_int("kv_budget"), positive_int("kv_window"), positive_int("kv_pool")
        if budget is None:
            for name, value in (("kv_window", window), ("kv_pool", pool)):
                if value is not None:
                    raise ConfigError(f"{name}={value!r}: has no effect without kv_budget (KV-cache compression is off)")
            return
        if window is not None and window > self.last_q:
            raise ConfigError(f"kv_window={window!r}: larger than the estimation probe last_q={self.last_q} "
                              "(the window's votes are the probe's queries)")
        window = self.kv_window_used
        if budget < window:
            given = "" if self.kv_window is not None else ", the default: last_q"
            raise ConfigError(f"kv_budget={budget!r}: smaller than the observation window (kv_window={window}{given}), "
                              "which is always kept")
        if pool is not None and pool % 2 == 0:
            raise ConfigError(f"kv_pool={pool!r}: must be odd (a centred max-pooling kernel)")

    @property
    def kv_window_used(self) -> int:
        """The observation window of KV-cache compression (``kv_window``, or ``last_q``)."""
        return self.kv_window if self.kv_window is not None else self.last_q

    @property
    def kv_pool_used(self) -> int:
        return self.kv_pool if self.kv_pool is not None else 7

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **overrides: Any) -> "BackendConfig":
        """Build from torch.compile's ``options=`` dict; ``config`` is an alias of ``plan``. Errors name
        the option and its value first: ``config='nope.json': cannot read plan file: ...``."""
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(f"options={options!r}: expected a dict of settings, like {{'config': 'plan.json'}}")
        opts = dict(options or {})
        opts.update(overrides)
        cfg = None
        if "config" in opts:
            if "plan" in opts:
                raise ConfigError("give either 'config' or 'plan', not both")
            cfg = opts.pop("config")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - fields)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(fields | {'config'})}")
        if isinstance(cfg, BackendConfig):
            return dataclasses.replace(cfg, **opts) if opts else cfg
        if cfg is not None:
            opts["plan"] = as_plan(cfg, "config")
        return cls(**opts)


def as_plan(value: Any, name: str = "plan") -> ModelPlan:
    """A :class:`ModelPlan` from an option's value (a plan, a path, a JSON object or None); errors
    start with ``name=value``."""
    if value is None:
        return ModelPlan()
    if isinstance(value, ModelPlan):
        return value
    sep = " " if name.startswith("-") else "="  # a command-line flag: --config 'plan.json'
    if isinstance(value, (str, os.PathLike)):
        try:
            return _read_plan(value)
        except ConfigError as e:
            raise ConfigError(f"{name}{sep}{os.fspath(value)!r}: {e}") from None
    if isinstance(value, (list, Mapping)):
        try:
            return ModelPlan.from_json(value)
        except ConfigError as e:
            raise ConfigError(f"{name} (a JSON {type(value).__name__}): {e}") from None
    raise ConfigError(f"{name}{sep}{value!r}: expected a ModelPlan, a path to a plan JSON or a JSON object, "
                      f"got {type(value).__name__}")


def clamp_budget(pattern: Pattern, budget: Sequence[int], seq_len: int) -> tuple[int, ...]:
    """The budget actually used at length ``seq_len`` (MInference's clamps)."""
    if pattern is Pattern.VERTICAL_SLASH:
        v, s = budget
        return (min(seq_len, max(v, 30)), min(seq_len, max(s, 50)))
    if pattern is Pattern.A_SHAPE:
        n_init, n_local = budget
        return (min(seq_len, n_init), min(seq_len, n_local))
    if pattern is Pattern.BLOCK_SPARSE:
        return (min(math.ceil(seq_len / 64), budget[0]),)
    return ()


def iter_patterns(heads: Iterable[HeadPattern]) -> set[Pattern]:
    return {hp.pattern for hp in heads}
