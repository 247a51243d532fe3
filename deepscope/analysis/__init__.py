"""The math: pure functions on ``nn.Module``s and tensors. No I/O, no Redis, no HTTP.

* :mod:`~deepscope.analysis.signal_space`: SVD of every layer (rank, condition number, ...);
* :mod:`~deepscope.analysis.residuals`: what each layer keeps (row space) and loses;
* :mod:`~deepscope.analysis.inverse`: the paper's inverse maps (ideal inputs per class);
* :mod:`~deepscope.analysis.optimize`: input optimization (activation maximization,
  caricatures, inversion) from composable objectives, parametrizations and regularizers;
* :mod:`~deepscope.analysis.hooks` and :mod:`~deepscope.analysis.layers`: the plumbing.
"""

from deepscope.analysis.hooks import Capture, Where, capture_activations, eval_mode
from deepscope.analysis.inverse import (
    ExactInverseResult,
    InverseImagesResult,
    StartMethod,
    TargetMode,
    exact_inverse,
    inverse_images,
    invertible_chain,
    output_targets,
    refine,
)
from deepscope.analysis.layers import LayerKind, WeightLayer, select_layers, weight_layers
from deepscope.analysis.optimize import (
    AnalysisResult,
    OptimizationResult,
    activation_maximization,
    caricature,
    inversion,
    optimize,
)
from deepscope.analysis.residuals import (
    LayerResiduals,
    RowSpaceResult,
    per_row_residuals,
    residual_metrics,
    residuals,
    row_space_residual,
)
from deepscope.analysis.signal_space import (
    ConvView,
    LayerSpectrum,
    SpectrumStats,
    conv_operator_singular_values,
    layer_matrix,
    signal_space,
    spectrum_stats,
)

__all__ = [
    "AnalysisResult",
    "Capture",
    "ConvView",
    "ExactInverseResult",
    "InverseImagesResult",
    "LayerKind",
    "LayerResiduals",
    "LayerSpectrum",
    "OptimizationResult",
    "RowSpaceResult",
    "SpectrumStats",
    "StartMethod",
    "TargetMode",
    "WeightLayer",
    "Where",
    "activation_maximization",
    "capture_activations",
    "caricature",
    "conv_operator_singular_values",
    "eval_mode",
    "exact_inverse",
    "inverse_images",
    "inversion",
    "invertible_chain",
    "layer_matrix",
    "optimize",
    "output_targets",
    "per_row_residuals",
    "refine",
    "residual_metrics",
    "residuals",
    "row_space_residual",
    "select_layers",
    "signal_space",
    "spectrum_stats",
    "weight_layers",
]
