"""The checkout's source folder ``kernels/`` against the Hugging Face ``kernels`` package.

transformers >= 5.25 requires and imports the Hugging Face package ``kernels``. Where Python runs in
the repository root (pytest, ``python -c``/``-m`` there) our ``kernels/`` folder comes first on
sys.path under that name; it must hand the name over, or every ``import transformers`` model fails
(seen in CI with transformers 5.25: ``cannot import name 'CUDAProperties' from 'kernels'``).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_top_level_kernels_name_from_the_repository_root():
    where = Path(_run("import kernels; print(kernels.__file__)"))
    if _hub_kernels_installed():
        # the installed distribution's own file (a virtual environment inside the checkout, e.g. .venv, is fine)
        installed = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
        assert where.resolve() == installed, f"{where}: our folder shadows the installed Hugging Face package"
    else:
        assert where == ROOT / "kernels" / "__init__.py"  # nothing to hand over: ours, as before


def test_transformers_models_import_in_the_repository_root_and_ours_stay_ours():
    out = _run("import transformers.modeling_utils, kernels, mif_compile.kernels as K; "
               "print(K.__file__); print(callable(K.sparse_attention))")
    ours, ok = out.splitlines()[-2:]
    assert Path(ours) == ROOT / "kernels" / "__init__.py" and ok == "True"
