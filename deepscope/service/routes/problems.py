"""``/v1/problems``: what each kind of error means. The ``type`` of every problem body
(``/v1/problems/<slug>``) resolves here, without an API key, so that a person who meets one in
a log can read what it means."""

from __future__ import annotations

from fastapi import APIRouter

from deepscope.contract.api import ProblemInfoOut, ProblemOut
from deepscope.contract.errors import PROBLEM_PREFIX, ProblemType, problem_info
from deepscope.service.deps import PROBLEM_JSON, not_found

__all__ = ["router"]

router = APIRouter(prefix="/v1/problems", tags=["health"])


def _info(kind: ProblemType) -> ProblemInfoOut:
    info = problem_info(kind.value)
    assert info is not None  # every ProblemType is described
    title, statuses, description = info
    return ProblemInfoOut(
        type=PROBLEM_PREFIX + kind.value,
        slug=kind.value,
        title=title,
        status=list(statuses),
        description=description,
    )


@router.get("", response_model=list[ProblemInfoOut], summary="Every kind of error the API answers")
async def list_problems() -> list[ProblemInfoOut]:
    return [_info(kind) for kind in ProblemType]


@router.get(
    "/{slug}",
    response_model=ProblemInfoOut,
    summary="What one kind of error means",
    responses={
        404: {
            "model": ProblemOut,
            "description": "No such problem type: not_found",
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemOut"}}},
        }
    },
)
async def get_problem(slug: str) -> ProblemInfoOut:
    try:
        kind = ProblemType(slug)
    except ValueError:
        raise not_found("problem type", repr(slug)) from None
    return _info(kind)
