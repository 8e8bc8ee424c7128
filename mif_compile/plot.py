"""Pictures of a plan and of one head: ``mif-compile show PLAN --plot OUT.png [--head L:H ...]``.

matplotlib is optional: it is imported here, lazily, and a missing install gives a clear error.
Only the Agg canvas is used (no pyplot state, no display needed).

- :func:`plot_plan`: two heatmaps over (layer, head): the chosen pattern (vertical-slash heads with a
  mass target, the adaptive index, in a colour of their own, with the target written on the cell) and
  its recall.
- :func:`plot_head`: one head's attention map on a calibration input, averaged over tiles of
  ``ceil(N / max_px)`` positions (the mass a query of the row tile puts on the key tile, log scale),
  and the same map with the keys the head's pattern keeps over it (the index the op would build
  on this input). Rows are computed a chunk at a time; nothing of size N x N is held.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .config import ConfigError, HeadPattern, ModelPlan, Pattern

__all__ = ["plot_plan", "plot_head", "head_maps"]

# the plan map's categories: the patterns, and vertical-slash heads with a mass target (the adaptive index)
_MASS = "vertical_slash, mass target"
_COLORS = {Pattern.DENSE: "#9e9e9e", Pattern.A_SHAPE: "#1f77b4", Pattern.VERTICAL_SLASH: "#ff7f0e",
           Pattern.BLOCK_SPARSE: "#2ca02c", _MASS: "#d62728"}
_ORDER = [Pattern.DENSE, Pattern.A_SHAPE, Pattern.VERTICAL_SLASH, Pattern.BLOCK_SPARSE, _MASS]


def _category(hp: HeadPattern):
    return _MASS if hp.adaptive else hp.pattern


def _label(cat) -> str:
    return cat.value if isinstance(cat, Pattern) else cat


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which mif-compile does not depend on: pip install matplotlib") from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_plan(plan: ModelPlan, path: str | os.PathLike) -> None:
    """Heatmaps of the chosen pattern and of the recall per (layer, head)."""
    if plan.layers is None:
        raise ConfigError("a uniform plan has no per-layer heads to plot")
    fig = _figure(1, 1)  # fails first, with the install hint, when matplotlib is missing
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    n_layers, n_heads = len(plan.layers), max(len(layer) for layer in plan.layers)
    codes = torch.full((n_layers, n_heads), float("nan"))
    recall = torch.full((n_layers, n_heads), float("nan"))
    for i, layer in enumerate(plan.layers):
        for h, hp in enumerate(layer):
            codes[i, h] = _ORDER.index(_category(hp))
            if hp.score is not None:
                recall[i, h] = hp.score
    fig.set_size_inches(max(8.0, 3 + 0.36 * min(n_heads, 64)), max(3.5, 1.8 + 0.22 * min(n_layers, 96)))
    ax1, ax2 = fig.subplots(1, 2)
    cmap = ListedColormap([_COLORS[p] for p in _ORDER])
    ax1.imshow(codes.numpy(), cmap=cmap, vmin=-0.5, vmax=len(_ORDER) - 0.5, aspect="auto", interpolation="nearest")
    ax1.set_title("pattern")
    used = [p for p in _ORDER if any(_category(hp) == p for layer in plan.layers for hp in layer)]
    n_mass = plan.count_mass()
    if n_mass:  # each adaptive head's target, written on its cell when the map is small enough to read
        if n_layers * n_heads <= 1024:
            for i, layer in enumerate(plan.layers):
                for h, hp in enumerate(layer):
                    if hp.adaptive:
                        ax1.text(h, i, f"{hp.mass:g}", ha="center", va="center", fontsize=6, color="white")
        targets = sorted({hp.mass for layer in plan.layers for hp in layer if hp.adaptive})
        ax1.set_title(f"pattern ({n_mass} heads with a mass target: " + ", ".join(f"{m:g}" for m in targets) + ")",
                      fontsize=9)
    fig.legend(handles=[Patch(color=_COLORS[p], label=_label(p)) for p in used], loc="lower center",
               ncol=len(used), fontsize=8, frameon=False)
    name = plan.score_name()  # "score" when MInference's 4th field is a raw search score, not a recall
    if torch.isnan(recall).all():
        ax2.text(0.5, 0.5, "no recall in this plan", ha="center", va="center", transform=ax2.transAxes)
    else:
        lo, hi = float(recall[~torch.isnan(recall)].min()), float(recall[~torch.isnan(recall)].max())
        vmin, vmax = (min(lo, 0.95), 1.0) if name == "recall" else (lo, hi)
        im = ax2.imshow(recall.numpy(), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.04)
    ax2.set_title("recall (attention mass kept)" if name != "score" else "score (MInference's, not a recall)")
    for ax in (ax1, ax2):
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(os.fspath(path))


def head_maps(q: torch.Tensor, k: torch.Tensor, hp: HeadPattern, *, scale: float, max_px: int = 512,
              last_q: int = 64, block_m: int = 64, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, int]:
    """One head (q, k: [1, 1, N, D]) on tiles of ``tile`` x ``tile`` positions, P = ceil(N / tile):
    attention [P, P] (mean over the tile's queries of their mass on the tile's keys) and kept [P, P]
    (the share of the tile's causal pairs that the head's index keeps); returns (attn, kept, tile).
    Memory O(N^2 / BLOCK_M) for the kept keys of each query block, O(rows x N) per chunk."""
    from .search import candidate_index

    n = q.shape[2]
    tile = max(1, math.ceil(n / max_px))
    px = math.ceil(n / tile)
    cover = _kept_keys(candidate_index(q, k, hp, scale=scale, last_q=last_q, block_m=block_m, impl=impl), n)
    attn = torch.zeros(px, px, dtype=torch.float64)
    kept = torch.zeros(px, px, dtype=torch.float64)
    pairs = torch.zeros(px, px, dtype=torch.float64)
    keys = torch.arange(n, device=q.device)
    kf = k[0, 0].float()
    to_tiles = lambda x: F.pad(x, (0, px * tile - n)).view(x.shape[0], px, tile).sum(-1).double().cpu()  # noqa: E731
    rows_per = max(tile, (1 << 24) // max(n, 1) // tile * tile)
    for r0 in range(0, n, rows_per):
        r = torch.arange(r0, min(r0 + rows_per, n), device=q.device)
        causal = keys[None, :] <= r[:, None]  # [R, N]
        s = (q[0, 0, r].float() @ kf.T) * scale
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        rt = (r // tile).cpu()
        attn.index_add_(0, rt, to_tiles(p))
        kept_rows = causal if cover is None else causal & cover.to(q.device)[r // block_m]
        kept.index_add_(0, rt, to_tiles(kept_rows.float()))
        pairs.index_add_(0, rt, to_tiles(causal.float()))
    rows_in_tile = torch.bincount(torch.arange(n) // tile, minlength=px).double()
    return attn / rows_in_tile[:, None], torch.where(pairs > 0, kept / pairs.clamp(min=1), 0.0), tile


def _kept_keys(index, n: int) -> torch.Tensor | None:
    """bool [NM, N]: keys the index keeps for each query block (None: every key)."""
    if index is None:
        return None
    bc, bo, cc, ci = (t[0, 0].long().cpu() for t in index)  # [NM], [NM, CAP]
    nm = bc.shape[0]
    diff = torch.zeros(nm, n + 1, dtype=torch.int32)
    ok = torch.arange(bo.shape[1]) < bc[:, None]
    start = bo.clamp(0, n)
    end = (start + 64).clamp(max=n)
    diff.scatter_add_(1, torch.where(ok, start, n), ok.int())
    diff.scatter_add_(1, torch.where(ok, end, n), -ok.int())
    cover = diff[:, :n].cumsum(1) > 0
    cok = torch.arange(ci.shape[1]) < cc[:, None]
    hits = torch.zeros(nm, n + 1, dtype=torch.int32)
    hits.scatter_add_(1, torch.where(cok, ci.clamp(min=0), n), cok.int())
    return cover | (hits[:, :n] > 0)


def plot_head(q: torch.Tensor, k: torch.Tensor, hp: HeadPattern, path: str | os.PathLike, *, scale: float,
              title: str = "", max_px: int = 512, last_q: int = 64, block_m: int = 64, impl: str = "auto") -> None:
    """The head's attention map, and the same map with the kept blocks and columns over it."""
    attn, kept, tile = head_maps(q, k, hp, scale=scale, max_px=max_px, last_q=last_q, block_m=block_m, impl=impl)
    fig = _figure(12, 6)
    ax1, ax2 = fig.subplots(1, 2)
    img = torch.log10(attn.clamp(min=1e-8)).numpy()
    ax1.imshow(img, cmap="magma", vmin=-8, vmax=0, interpolation="nearest")
    ax1.set_title(f"attention (log10 mass per {tile}x{tile} tile)")
    ax2.imshow(img, cmap="gray", vmin=-8, vmax=0, interpolation="nearest")
    overlay = torch.zeros(*kept.shape, 4)
    overlay[..., 1] = 0.9
    overlay[..., 3] = torch.where(kept > 0, 0.25 + 0.45 * kept, 0.0).float()  # a lone column must still show
    ax2.imshow(overlay.numpy(), interpolation="nearest")
    ax2.set_title(f"kept: {hp.describe()} (green)")
    for ax in (ax1, ax2):
        ax.set_xlabel(f"key (x{tile})")
        ax.set_ylabel(f"query (x{tile})")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
