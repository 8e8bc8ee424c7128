"""benchmarks/default_table.py counts, per mass target, the cells whose error is within the fixed budgets'."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import default_table  # noqa: E402


def _row(n, mix, mode, speedup, vs_fixed, err):
    return dict(seq_len=n, mix=mix, mode=mode, speedup=speedup, vs_fixed=vs_fixed, err_ref=err)


def test_counts_cells_within_the_fixed_error():
    rows = [_row(131072, "mixed", "fixed", 1.5, 1.0, 0.01), _row(131072, "mixed", "mass1", 4.0, 2.7, 0.009),
            _row(131072, "mixed", "mass0.99", 5.0, 3.3, 0.012),
            _row(1 << 20, "local", "fixed", 50.0, 1.0, 0.007), _row(1 << 20, "local", "mass1", 52.0, 1.05, 0.003),
            _row(1 << 20, "local", "mass0.99", 150.0, 3.0, 0.008)]
    text = "\n".join(default_table.op_table(rows))
    assert "| 128K | mixed | 1.5x, 0.0100 | 5.0x, 3.30x, 1.20 | 4.0x, 2.70x, 0.90 |" in text, text
    assert "| 1M | local |" in text
    assert "- mass1: 2 of 2 cells with an error no larger than the fixed budgets'; speed over fixed 1.05-2.70x" in text
    assert "- mass0.99: 0 of 2" not in text and "- mass0.99: no cell within the fixed budgets' error" in text
