"""The pure parts of the pipeline contract: problem types, labels, cursors."""

from __future__ import annotations

import pytest

from deepscope.contract.api import MAX_LABELS, JobIn, ProblemOut, check_labels
from deepscope.contract.errors import ProblemType, problem_info, problem_slug
from deepscope.store.records import CursorError, decode_cursor, encode_cursor, new_id


def test_every_problem_type_is_described() -> None:
    for kind in ProblemType:
        info = problem_info(kind.value)
        assert info is not None, kind
        title, statuses, description = info
        assert title and description and all(400 <= s < 600 for s in statuses)
    assert problem_info("nope") is None
    assert problem_slug(404) == "not_found" and problem_slug(422) == "invalid_params"
    assert problem_slug(502) == "internal" and problem_slug(405) == "http_405"


def test_problem_out_keeps_extension_members() -> None:
    body = {"type": "/v1/problems/x", "title": "t", "status": 409, "detail": "d", "instance": "/"}
    assert ProblemOut.model_validate(body | {"errors": None, "extra": 1}).model_extra == {
        "extra": 1
    }


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ({"git_sha": "3f2a9c1", "branch": "feature/x", "a.b-c": ""}, None),
        ({"-a": "x"}, "label key"),
        ({"a b": "x"}, "label key"),
        ({"k" * 64: "x"}, "label key"),
        ({"k": "x" * 257}, "printable"),
        ({"k": "tab\there"}, "printable"),
        ({f"k{i}": "v" for i in range(MAX_LABELS + 1)}, "at most"),
    ],
)
def test_labels_rules(labels: dict[str, str], problem: str | None) -> None:
    if problem is None:
        assert check_labels(labels) == labels
        assert JobIn(model_id="m", analysis="a", labels=labels).labels == labels
    else:
        with pytest.raises(ValueError, match=problem):
            check_labels(labels)


def test_cursors_round_trip_and_refuse_others() -> None:
    rec_id = new_id()
    for score in (1718000000.123456, 0.1 + 0.2, 1e-9):
        assert decode_cursor(encode_cursor(score, rec_id)) == (score, rec_id)
    for bad in ("", "zz", "not a cursor", encode_cursor(1.0, "x" * 32).replace("A", "B")):
        with pytest.raises(CursorError):
            decode_cursor(bad)
