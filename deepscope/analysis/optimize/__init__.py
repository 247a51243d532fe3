"""Input optimization: activation maximization, caricatures (DeepDream), inversion.

Composable parts: :mod:`.objectives` (what to maximize), :mod:`.param` (image
parametrizations), :mod:`.transforms` (random robustness transforms, one draw per image),
:mod:`.regularizers` (image priors), :mod:`.engine` (the optimization loop) and
:mod:`.analyses` (the three analyses the service runs).
"""

from deepscope.analysis.optimize.analyses import (
    AnalysisResult,
    activation_maximization,
    caricature,
    inversion,
)
from deepscope.analysis.optimize.engine import (
    MAX_STEPS,
    OptimizationResult,
    optimize,
    score_images,
)
from deepscope.analysis.optimize.objectives import (
    MODEL_OUTPUT,
    Objective,
    channel,
    class_logit,
    direction,
    layer_l2,
    neuron,
    per_image,
    representation_match,
)
from deepscope.analysis.optimize.param import (
    FFTParam,
    ImageParam,
    LowResParam,
    ParamKind,
    PixelParam,
    Squash,
    image_param,
)
from deepscope.analysis.optimize.regularizers import (
    AlphaNorm,
    BatchNormPrior,
    BlurPenalty,
    Regularizer,
    TotalVariation,
    batchnorm_prior,
    l2,
)
from deepscope.analysis.optimize.rng import RandomSource, target_generators
from deepscope.analysis.optimize.transforms import (
    Blur,
    Jitter,
    Pad,
    RandomRotate,
    RandomScale,
    Transform,
    apply_transforms,
    default_transforms,
)

__all__ = [
    "MAX_STEPS",
    "MODEL_OUTPUT",
    "AlphaNorm",
    "AnalysisResult",
    "BatchNormPrior",
    "Blur",
    "BlurPenalty",
    "FFTParam",
    "ImageParam",
    "Jitter",
    "LowResParam",
    "Objective",
    "OptimizationResult",
    "Pad",
    "ParamKind",
    "PixelParam",
    "RandomRotate",
    "RandomScale",
    "RandomSource",
    "Regularizer",
    "Squash",
    "TotalVariation",
    "Transform",
    "activation_maximization",
    "apply_transforms",
    "batchnorm_prior",
    "caricature",
    "channel",
    "class_logit",
    "default_transforms",
    "direction",
    "image_param",
    "inversion",
    "l2",
    "layer_l2",
    "neuron",
    "optimize",
    "per_image",
    "representation_match",
    "score_images",
    "target_generators",
]
