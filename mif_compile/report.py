"""What the backend did to each compiled graph: which SDPA sites run sparse, which stay dense and why,
and, once the graph has run, what each rewritten site did at run time.

Every call of the backend appends a :class:`CompileReport`; ``mif_compile.last_report()`` returns the
newest, ``mif_compile.reports()`` all of them. The same lines go to the ``mif_compile`` logger
(INFO for the summary, DEBUG per site); set ``MIF_COMPILE_LOG=info`` (or ``debug``) to print them.

A rewritten site can still run dense SDPA at run time: below ``min_seq_len``, when the estimated
index keeps more than ``max_density`` of the causal pairs, or on CPU with ``impl="auto"``. The op
records every call per site (:func:`record_run`, host-side counters, no device read of its own);
the report's ``run`` lines show them, and the first dense run of a site for each reason is logged
at INFO. Replays of a captured CUDA graph run no Python and are not counted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter

log = logging.getLogger("mif_compile")
_level = os.environ.get("MIF_COMPILE_LOG", "").strip().upper()
if _level in ("DEBUG", "INFO", "WARNING") and not log.handlers:
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("[mif_compile] %(message)s"))
    log.addHandler(_h)
    log.setLevel(_level)
elif _level not in ("", "DEBUG", "INFO", "WARNING"):  # say so instead of ignoring it
    log.warning("mif_compile: MIF_COMPILE_LOG=%r is not one of info, debug, warning; no log lines are printed",
                os.environ["MIF_COMPILE_LOG"])

__all__ = ["CompileReport", "SiteRuns", "last_report", "reports", "clear_reports", "register_site", "record_run",
           "record_kv"]

_REPORTS: list["CompileReport"] = []
_MAX_REPORTS = 256

# why a rewritten site ran dense SDPA at run time (the keys of SiteRuns.dense)
SHORT = "below min_seq_len"
DENSITY = "density above max_density"
CPU_AUTO = "CPU with impl='auto'"
PLAN_DENSE = "every head's plan is dense"

_EXPLAIN = {
    SHORT: "the prompt is shorter than min_seq_len",
    DENSITY: "the estimated index kept more than max_density of the causal pairs (dense kernels are faster per pair)",
    CPU_AUTO: "on CPU the sparse path is the pure-PyTorch reference, slower than dense SDPA; impl='reference' "
              "runs it anyway",
    PLAN_DENSE: "no head of the plan is sparse",
}


@dataclasses.dataclass
class SiteRuns:
    """What one rewritten site did at run time, over all its calls so far."""

    graph_id: int
    layer: int | None
    module: str | None
    calls: int = 0
    sparse: int = 0
    dense: Counter = dataclasses.field(default_factory=Counter)  # reason -> calls
    last_seq_len: int | None = None
    last_density: float | None = None  # kept share of causal pairs, when the op read it
    last_reason: str | None = None  # the newest dense call's reason with its numbers
    last_missed: tuple | None = None  # adaptive heads: (short of the target, all, ran the fixed choice)
    last_kv: tuple | None = None  # KV-cache compression: (prompt length, keys kept per kv head) of the newest call

    def format(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else (self.module or "site")
        if not self.calls:
            return f"  run     {where}: not called yet"
        parts = [f"{self.sparse} sparse"] + [f"{n} dense ({r})" for r, n in self.dense.items()]
        line = f"  run     {where}: {self.calls} call(s), " + ", ".join(parts) + f"; last N={self.last_seq_len}"
        if self.last_density is not None:
            line += f", kept density {self.last_density:.3f}"
        if self.last_missed is not None:
            missed, total, fixed = self.last_missed
            line += f", mass target reached by {total - missed}/{total} adaptive head(s)"
            notes = []
            if missed - fixed:
                notes.append(f"{missed - fixed} kept every candidate within their caps")
            if fixed:
                notes.append(f"{fixed} ran the fixed choice of their caps")
            if notes:
                line += " (" + "; ".join(notes) + ")"
        if self.dense:
            line += f"; last dense: {self.last_reason}"
        if self.last_kv is not None:
            line += f"; cache kept {self.last_kv[1]} of {self.last_kv[0]} keys per kv head"
        return line


_SITES: list[SiteRuns] = []  # indexed by the site id the op carries


def register_site(graph_id: int, layer: int | None, module: str | None) -> int:
    """A new site id for a rewritten site of graph ``graph_id`` (baked into its op call)."""
    _SITES.append(SiteRuns(graph_id, layer, module))
    return len(_SITES) - 1


def site_layer(site: int) -> int | None:
    """The layer of a site id the op carries (None for calls made outside the backend)."""
    return _SITES[site].layer if 0 <= site < len(_SITES) else None


def record_run(site: int, seq_len: int, dense_reason: str | None, detail: str = "",
               density: float | None = None, missed: tuple | None = None) -> None:
    """One op call of ``site`` (host-side bookkeeping only): sparse when ``dense_reason`` is None,
    else dense for that reason (``detail``: its numbers, e.g. ``N=4096 < 32768``). The first dense
    call of a site for each reason is logged at INFO, the first CPU-auto call of the process once."""
    if not 0 <= site < len(_SITES):
        return  # an op call made outside the backend (tests, search), or after clear_reports()
    r = _SITES[site]
    r.calls += 1
    r.last_seq_len = seq_len
    if density is not None:
        r.last_density = density
    if missed is not None:
        r.last_missed = tuple(missed)
    if dense_reason is None:
        r.sparse += 1
        return
    first = r.dense[dense_reason] == 0
    r.dense[dense_reason] += 1
    r.last_reason = f"{dense_reason}{': ' + detail if detail else ''}"
    if first:
        where = f"layer {r.layer}" if r.layer is not None else (r.module or f"site {site}")
        log.info(f"graph {r.graph_id} {where} ran dense SDPA at N={seq_len}: {r.last_reason} "
                 f"({_EXPLAIN[dense_reason]})")


def record_kv(site: int, seq_len: int, kept: int) -> None:
    """KV-cache compression of one call of ``site``: ``kept`` of ``seq_len`` keys per kv head."""
    if 0 <= site < len(_SITES):
        _SITES[site].last_kv = (seq_len, kept)


@dataclasses.dataclass
class CompileReport:
    """One compiled graph: its SDPA sites (``passes.Site``), counters and settings."""

    graph_id: int
    sites: list
    counters: Counter
    min_seq_len: int
    impl: str
    notes: list = dataclasses.field(default_factory=list)  # how the graph was compiled, e.g. CUDA graphs
    rank_heads: dict = dataclasses.field(default_factory=dict)  # tensor parallel: layer -> distributed.RankHeads
    site_ids: list = dataclasses.field(default_factory=list)  # run-time records of the rewritten sites

    @property
    def rewritten(self) -> list:
        return [s for s in self.sites if s.rewritten]

    @property
    def dense(self) -> list:
        return [s for s in self.sites if not s.rewritten]

    @property
    def runs(self) -> list[SiteRuns]:
        """Run-time record of each rewritten site, in graph order (empty lists before the first call)."""
        return [_SITES[i] for i in self.site_ids if i < len(_SITES)]

    @property
    def ran_dense(self) -> list[SiteRuns]:
        """Rewritten sites that ran dense SDPA in at least one call so far."""
        return [r for r in self.runs if r.dense]

    def run_summary(self) -> str:
        """One line: how many rewritten sites ran dense SDPA at run time, and why."""
        runs = [r for r in self.runs if r.calls]
        if not runs:
            return "at run time: no rewritten site was called yet"
        dense = [r for r in runs if r.dense]
        if not dense:
            return f"at run time: all {len(runs)} rewritten site(s) ran sparse"
        why = "; ".join(f"{k}: {_EXPLAIN[k]}" for k in _reasons(dense))
        return f"at run time: {len(dense)} of {len(runs)} rewritten site(s) ran dense SDPA in some call ({why})"

    def summary(self) -> str:
        return (
            f"graph {self.graph_id}: {len(self.sites)} SDPA site(s), {len(self.rewritten)} sparse, "
            f"{len(self.dense)} left dense (sparse from {self.min_seq_len} tokens, impl={self.impl})"
        )

    def format(self) -> str:
        lines = [self.summary()]
        for s in self.sites:
            where = s.module or s.node
            if s.rewritten:
                counts = Counter(hp.describe() for hp in s.patterns)
                pats = ", ".join(f"{n} x {d}" for d, n in counts.items())
                gqa = f", GQA {s.num_heads}/{s.num_kv_heads}" if s.num_kv_heads != s.num_heads else ""
                held = self.rank_heads.get(s.layer)
                tp = f", {held.describe()}" if held is not None else ""
                lines.append(f"  sparse  {where} [layer {s.layer}, {s.reason}{gqa}{tp}]: {pats}{vs_mode(s.patterns)}")
            else:
                lines.append(f"  dense   {where}: {s.reason}")
            if getattr(s, "kv", None):
                lines.append(f"    kv    {s.kv}")
        lines.extend(f"  note    {n}" for n in self.notes)
        runs = self.runs
        if any(r.calls for r in runs):
            lines.append(f"  {self.run_summary()}")
            lines.extend(r.format() for r in runs)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def vs_mode(heads) -> str:
    """``"; vertical-slash: ..."``: whether a site's vertical-slash heads run MInference's fixed budgets
    or the adaptive index (a mass target), or both; empty when it has none."""
    vs = [hp for hp in heads if hp.pattern.value == "vertical_slash"]
    if not vs:
        return ""
    targets = Counter(hp.mass for hp in vs if hp.adaptive)
    fixed = len(vs) - sum(targets.values())
    parts = [f"{fixed} fixed budgets"] if fixed else []
    parts += [f"{n} mass target {m:g}" for m, n in sorted(targets.items())]
    if len(parts) == 1:
        parts = ["fixed budgets" if fixed else f"mass target {next(iter(targets)):g} (adaptive)"]
    return "; vertical-slash: " + ", ".join(parts)


def _reasons(runs: list[SiteRuns]) -> list[str]:
    return list(dict.fromkeys(k for r in runs for k in r.dense))


def _record(report: CompileReport) -> None:
    _REPORTS.append(report)
    del _REPORTS[:-_MAX_REPORTS]
    log.info(report.summary())
    for line in report.format().splitlines()[1:]:
        log.debug(line)


def last_report() -> CompileReport | None:
    """The report of the most recent graph the backend compiled (None before any)."""
    return _REPORTS[-1] if _REPORTS else None


def reports() -> list[CompileReport]:
    """All reports since start (or since :func:`clear_reports`), oldest first."""
    return list(_REPORTS)


def clear_reports() -> None:
    """Forget every report (the run-time records stay: compiled graphs still carry their site ids)."""
    _REPORTS.clear()
