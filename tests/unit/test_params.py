"""Analysis parameters are validated before any work starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deepscope.analyses import parse_params
from deepscope.analyses.residuals import ResidualsParams
from deepscope.analyses.signal_space import SignalSpaceParams


def test_defaults_per_analysis() -> None:
    params = parse_params("signal_space")
    assert isinstance(params, SignalSpaceParams) and params.view == "kernels"
    params = parse_params("residuals", {"inputs": "samples", "samples_per_class": 3})
    assert isinstance(params, ResidualsParams) and params.samples_per_class == 3


def test_unknown_analysis_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown analysis 'svd'; valid analyses: signal_space"):
        parse_params("svd")


@pytest.mark.parametrize(
    ("analysis", "params", "field"),
    [
        ("signal_space", {"view": "rows"}, "view"),
        ("signal_space", {"vectors": -1}, "vectors"),
        ("signal_space", {"colour": 1}, "colour"),
        ("residuals", {"max_iter": 0}, "max_iter"),
        ("residuals", {"rtol": 2.0}, "rtol"),
    ],
)
def test_out_of_range_params_name_the_field(
    analysis: str, params: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        parse_params(analysis, params)
    assert field in {str(p) for e in info.value.errors() for p in e["loc"]}
