"""Merge ``mif-compile eval`` results of other lengths into one: results.json, table.md, table.txt, needle.png.

    python benchmarks/eval_merge.py OUT_DIR RUN_A/results.json RUN_B/results.json ...

The GPU job (benchmarks/gpu_eval_long.sh) runs 64K and 128K in one call and 256K in a second,
time-boxed one; this joins them so that the README gets one table and one heatmap.
"""

from __future__ import annotations

import json
import os
import sys

from mif_compile.evaluate import describe, format_markdown, format_table, merge_results, plot_needle


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    out, paths = argv[0], argv[1:]
    parts = []
    for p in paths:
        with open(p) as f:
            parts.append(json.load(f))
    res = merge_results(parts)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"Model `{res.get('model', '?')}`.\n\n{format_markdown(res)}")
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(f"model {res.get('model', '?')}; {res.get('note', '')}\n{format_table(res)}\n{describe(res)}\n")
    written = ["results.json", "table.md", "table.txt"]
    try:
        plot_needle(res, os.path.join(out, "needle.png"))
        written.append("needle.png")
    except ImportError:
        print("needle.png not drawn: it needs matplotlib", file=sys.stderr)
    print(f"merged {len(paths)} result(s), lengths {res['lengths']}: wrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
