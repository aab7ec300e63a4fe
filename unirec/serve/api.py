"""Request and response models of ``POST /v1/rank``: the one API of every use case.

The context model is built from the artifact's unified schema at start, so the OpenAPI schema lists every
context field with its kind and an unknown field is a 422 that names it (``extra="forbid"``).
"""

from __future__ import annotations

from typing import Annotated, Dict, List, Literal, Optional, Type, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, create_model

from unirec.kinds import kind_of
from unirec.schema import FeatureSpec
from unirec.serve.config import Fallback

# An integer every JSON client reads exactly (I-JSON, RFC 7493: |n| < 2**53); larger ids go as strings.
# Unbounded, a huge id would pass validation and then fail to be written back (orjson: 64 bits at most).
JsonInt = Annotated[StrictInt, Field(ge=-(2**53 - 1), le=2**53 - 1)]
# An id as callers send it; answered back exactly as given.
CandidateId = Union[StrictStr, JsonInt]
MAX_TEXT = 1000
MAX_TIMEOUT_MS = 60_000.0


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExplicitCandidates(Strict):
    """Candidates named by id, all of one type."""

    ids: List[CandidateId] = Field(min_length=1, description="Candidate ids, in the caller's order")
    type: Optional[str] = Field(None, description="Candidate type; default: the task's own type")


class SourceCandidates(Strict):
    """Candidates drawn from a named source."""

    source: Literal["popular"] = Field(description="popular: the task's most engaged candidates in train")
    limit: int = Field(100, ge=1, description="How many to draw from the source")


class Degraded(Strict):
    """Whether a fallback answered, and why."""

    degraded: bool
    reason: Optional[Literal["timeout", "error", "non_finite"]] = None
    fallback: Optional[Fallback] = None
    detail: Optional[str] = None


class RankedCandidate(Strict):
    id: CandidateId
    type: str
    score: Optional[float] = Field(
        description="Model score (post-sigmoid); popularity share or null when degraded"
    )


class RankResponse(Strict):
    environment: str
    task: str
    model_version: str
    candidates: List[RankedCandidate]
    degraded: Degraded
    cached: bool = Field(description="Scores came from the score cache")
    ignored_context: List[str] = Field(
        description="Context fields of the unified schema this task does not use"
    )


class ErrorResponse(BaseModel):
    """4xx/5xx body: ``field`` names the offending input where there is one."""

    message: str
    field: Optional[str] = None
    detail: Optional[list] = None
    degraded: Optional[Degraded] = None


def context_model(spec: FeatureSpec) -> Type[BaseModel]:
    """A pydantic model with one optional attribute per unified context field, typed by the field's kind
    (:meth:`unirec.kinds.Kind.request_type`: an id, text, a finite number, a list of ids)."""
    fields: Dict[str, tuple] = {
        name: (kind_of(f).request_type(f, MAX_TEXT), Field(None)) for name, f in spec.context.items()
    }
    return create_model("Context", __config__=ConfigDict(extra="forbid"), **fields)


def rank_request_model(spec: FeatureSpec, environments: List[str], max_candidates: int) -> Type[BaseModel]:
    """The request model for this artifact's tasks and this process's environments."""
    tasks = tuple(spec.tasks)
    ctx = context_model(spec)
    return create_model(
        "RankRequest",
        __config__=ConfigDict(extra="forbid"),
        task=(Optional[Literal[tasks]], Field(None, description="Task (head); default: the environment's")),
        environment=(
            Optional[Literal[tuple(environments)]],
            Field(None, description="Environment; default: the one serving the task"),
        ),
        context=(ctx, Field(default_factory=ctx, description="Request context: unified-schema fields only")),
        candidates=(Union[ExplicitCandidates, SourceCandidates], ...),
        seen=(
            List[CandidateId],
            Field(
                default_factory=list, max_length=max_candidates, description="Ids the user has already seen"
            ),
        ),
        top_k=(Optional[int], Field(None, ge=1, le=max_candidates)),
        timeout_ms=(Optional[float], Field(None, gt=0, le=MAX_TIMEOUT_MS, allow_inf_nan=False)),
        fallback=(Optional[Fallback], None),
    )
