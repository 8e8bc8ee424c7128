"""mif-compile: a torch.compile backend for MInference-style dynamic sparse attention in prefill.

    model = torch.compile(model, backend="minference")

Importing this package registers the custom ops ``torch.ops.mif.sparse_attention`` (and
``sparse_attention_snapkv``) and nothing
else: no CUDA initialisation, no Triton kernel is compiled or imported.
"""

from . import kvcache, ops  # noqa: F401  (registers torch.ops.mif.sparse_attention and _snapkv once)
from .backend import backend, minference
from .config import BackendConfig, ConfigError, HeadPattern, ModelPlan, Pattern, load_plan, save_plan
from .report import CompileReport, clear_reports, last_report, reports

__version__ = "0.1.0"

__all__ = [
    "backend",
    "minference",
    "BackendConfig",
    "ConfigError",
    "HeadPattern",
    "ModelPlan",
    "Pattern",
    "load_plan",
    "save_plan",
    "CompileReport",
    "last_report",
    "reports",
    "clear_reports",
]
