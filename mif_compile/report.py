"""What the backend did to each compiled graph: which SDPA sites run sparse, which stay dense and why.

Every call of the backend appends a :class:`CompileReport`; ``mif_compile.last_report()`` returns the
newest, ``mif_compile.reports()`` all of them. The same lines go to the ``mif_compile`` logger
(INFO for the summary, DEBUG per site); set ``MIF_COMPILE_LOG=info`` (or ``debug``) to print them.
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

__all__ = ["CompileReport", "last_report", "reports", "clear_reports"]

_REPORTS: list["CompileReport"] = []
_MAX_REPORTS = 256


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

    @property
    def rewritten(self) -> list:
        return [s for s in self.sites if s.rewritten]

    @property
    def dense(self) -> list:
        return [s for s in self.sites if not s.rewritten]

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
                lines.append(f"  sparse  {where} [layer {s.layer}, {s.reason}{gqa}{tp}]: {pats}")
            else:
                lines.append(f"  dense   {where}: {s.reason}")
        lines.extend(f"  note    {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


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
    _REPORTS.clear()
