"""Every analysis deepscope runs, one package each, and the registry that lists them.

Each package's ``__init__`` is its torch-free spec (params model, metrics model, resource,
compute entry) and registers it; its ``compute`` module is the worker side (torch, rendering),
imported only where the analysis runs. See :mod:`deepscope.analyses.registry` and
``docs/architecture.md`` ("Adding an analysis").
"""

import importlib

from deepscope.analyses.registry import (
    AnalysisParams,
    AnalysisSpec,
    Resource,
    UnknownAnalysisError,
    analysis_names,
    get_analysis,
    list_analyses,
    metrics_model,
    parse_params,
    register_analysis,
    unregister_analysis,
)

#: The built-in analyses, in the order the CLI and the docs list them. Each registers itself
#: when imported.
BUILTIN = (
    "signal_space",
    "residuals",
    "inverse_images",
    "activation_maximization",
    "caricature",
    "inversion",
)
for _name in BUILTIN:
    importlib.import_module(f"deepscope.analyses.{_name}")

__all__ = [
    "BUILTIN",
    "AnalysisParams",
    "AnalysisSpec",
    "Resource",
    "UnknownAnalysisError",
    "analysis_names",
    "get_analysis",
    "list_analyses",
    "metrics_model",
    "parse_params",
    "register_analysis",
    "unregister_analysis",
]
