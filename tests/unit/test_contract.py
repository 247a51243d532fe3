"""The typed result contract: results validate into their analysis's metrics model, unknown
analyses keep their metrics, tables and per-layer values read the typed models."""

from __future__ import annotations

import numpy as np
import pytest

from deepscope.analyses.signal_space import SignalSpaceMetrics
from deepscope.analysis.spectrum_summary import spectrum_summary
from deepscope.contract import Metrics, Result, fmt
from deepscope.contract.errors import describe_errors, user_message


def _signal_space_result() -> dict[str, object]:
    return {
        "analysis": "signal_space",
        "metrics": {
            "view": "kernels",
            "layers": [
                {
                    "name": "fc1",
                    "kind": "linear",
                    "view": "kernels",
                    "matrix_shape": [10, 784],
                    "rank": 3,
                    "condition_number": None,
                    "stable_rank": 1.5,
                    "spectral_norm": 3.0,
                    "spectrum": spectrum_summary(np.array([3.0, 2.0, 0.5])),
                }
            ],
        },
        "artifacts": [{"name": "spectra", "url": "spectra.png"}],
    }


def test_a_result_is_typed_by_its_analysis() -> None:
    result = Result.model_validate(_signal_space_result())
    assert isinstance(result.metrics, SignalSpaceMetrics)
    typed = result.metrics_as(SignalSpaceMetrics)
    assert typed.layers[0].spectrum.min == 0.5
    # A round trip through JSON keeps the type and every field.
    again = Result.model_validate_json(result.model_dump_json())
    assert again == result
    assert result.artifact("spectra").media_type == "image/png"
    with pytest.raises(KeyError, match="spectra"):
        result.artifact("nope")


def test_tables_and_layer_values_of_signal_space() -> None:
    metrics = Result.model_validate(_signal_space_result()).metrics
    summary, layers = metrics.tables()
    assert summary.rows == [["view", "kernels"]]
    assert layers.rows == [["fc1", "linear", "kernels", "10×784", "3", "∞", "1.5", "3", "0.5"]]
    values = metrics.layer_values()
    assert values["fc1"]["condition_number"] is None
    assert values["fc1"]["smallest_singular_value"] == 0.5


def test_an_unknown_analysis_keeps_its_metrics() -> None:
    result = Result.model_validate(
        {
            "analysis": "from_a_newer_server",
            "metrics": {"targets": [{"target": "fc1:3", "loss": 0.25}]},
        }
    )
    assert type(result.metrics) is Metrics
    (generic,) = result.metrics.tables()
    assert generic.columns == ["target", "loss"] and generic.rows == [["fc1:3", "0.25"]]
    assert result.model_dump()["metrics"]["targets"][0]["loss"] == 0.25


def test_a_metrics_model_rejects_what_it_cannot_read() -> None:
    bad = _signal_space_result()
    bad["metrics"] = {"view": "kernels", "layers": [{"name": "fc1"}]}
    with pytest.raises(ValueError, match="rank"):
        Result.model_validate(bad)


def test_error_texts() -> None:
    assert fmt(1234567.0) == "1.235e+06" and fmt(None) == "—" and fmt(True) == "yes"
    assert describe_errors([{"loc": ("body", "params", "view"), "msg": "bad"}], skip=1) == (
        "params.view: bad"
    )
    assert user_message(ValueError("first line\nsecond")) == "first line"
