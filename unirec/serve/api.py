"""Request and response models of ``POST /v1/rank``: the one API of every use case.

The context model is built from the artifact's unified schema at start, so the OpenAPI schema lists every
context field with its kind and an unknown field is a 422 that names it (``extra="forbid"``).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Annotated, Dict, List, Literal, Optional, Type, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from unirec.kinds import RequestLimits, id_type, kind_of
from unirec.schema import FeatureSpec
from unirec.serve.config import Fallback

# Longest id (candidate or categorical context value) a request may send. Ids are keys of the score cache
# and of the featurization memo, so an unbounded one is memory a caller can make us keep.
MAX_ID_LEN = 256
# An id as callers send it; answered back exactly as given. Integers are bounded too: a huge one would pass
# validation and then fail to be written back (orjson: 64 bits at most).
CandidateId = id_type(MAX_ID_LEN)
MAX_TEXT = 1000
LIMITS = RequestLimits(text=MAX_TEXT, id=MAX_ID_LEN)
MAX_TIMEOUT_MS = 60_000.0
STRICT_JSON: ContextVar[bool] = ContextVar("unirec_strict_json", default=False)
"""True while validating a body that orjson parsed. orjson refuses a lone surrogate (escaped or as bytes)
outright, so no string of such a body can hold one and the Unicode walk over every id (a third of a
millisecond at 1000 candidates) is skipped; a body parsed by the lenient standard library, or a model
validated directly, is walked."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExplicitCandidates(Strict):
    """Candidates named by id, all of one type."""

    ids: List[CandidateId] = Field(min_length=1, description="Candidate ids, in the caller's order")
    type: Optional[StrictStr] = Field(
        None, max_length=MAX_ID_LEN, description="Candidate type; default: the task's own type"
    )


class SourceCandidates(Strict):
    """Candidates drawn from a named source."""

    source: Literal["popular"] = Field(description="popular: the task's most engaged candidates in train")
    limit: StrictInt = Field(100, ge=1, description="How many to draw from the source")


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
        name: (kind_of(f).request_type(f, LIMITS), Field(None)) for name, f in spec.context.items()
    }
    return create_model("Context", __config__=ConfigDict(extra="forbid"), **fields)


def rank_request_model(spec: FeatureSpec, environments: List[str], max_candidates: int) -> Type[BaseModel]:
    """The request model for this artifact's tasks and this process's environments.

    Every list is bounded here, so an oversized one is refused on its length before any item is validated
    (200,000 bad ids are one error, not 200,000); numbers are strict (``true`` or ``"3"`` is not a number);
    text must be valid Unicode (a JSON ``\\ud800`` escape can carry a lone surrogate, which no UTF-8 can).
    """
    tasks = tuple(spec.tasks)
    ctx = context_model(spec)
    explicit = create_model(
        "ExplicitCandidates",
        __base__=ExplicitCandidates,
        ids=(
            List[CandidateId],
            Field(
                min_length=1, max_length=max_candidates, description="Candidate ids, in the caller's order"
            ),
        ),
    )
    source = create_model(
        "SourceCandidates",
        __base__=SourceCandidates,
        limit=(
            StrictInt,
            Field(100, ge=1, le=max_candidates, description="How many to draw from the source"),
        ),
    )
    return create_model(
        "RankRequest",
        __config__=ConfigDict(extra="forbid"),
        __validators__={"unicode": model_validator(mode="after")(_valid_unicode)},
        task=(Optional[Literal[tasks]], Field(None, description="Task (head); default: the environment's")),
        environment=(
            Optional[Literal[tuple(environments)]],
            Field(None, description="Environment; default: the one serving the task"),
        ),
        context=(ctx, Field(default_factory=ctx, description="Request context: unified-schema fields only")),
        candidates=(
            Annotated[
                Union[
                    Annotated[explicit, Tag("ExplicitCandidates")], Annotated[source, Tag("SourceCandidates")]
                ],
                Discriminator(_candidates_kind),
            ],
            ...,
        ),
        seen=(
            List[CandidateId],
            Field(
                default_factory=list, max_length=max_candidates, description="Ids the user has already seen"
            ),
        ),
        top_k=(Optional[StrictInt], Field(None, ge=1, le=max_candidates)),
        timeout_ms=(Optional[StrictFloat], Field(None, gt=0, le=MAX_TIMEOUT_MS, allow_inf_nan=False)),
        fallback=(Optional[Fallback], None),
    )


def _candidates_kind(value: object) -> str:
    """Which candidates block a request sends, so its errors name that block's fields only."""
    has_source = "source" in value if isinstance(value, dict) else hasattr(value, "source")
    return "SourceCandidates" if has_source else "ExplicitCandidates"  # tags: _field leaves them out


def _valid_unicode(request: BaseModel) -> BaseModel:
    """Refuse text that is not valid Unicode, naming the field (``ctx.field``) it is in."""
    if STRICT_JSON.get():
        return request
    path = lone_surrogate(request, "")
    if path is not None:
        raise PydanticCustomError(
            "unicode", "{field}: not valid Unicode text (a lone surrogate)", {"field": path}
        )
    return request


def lone_surrogate(value: object, path: str) -> Optional[str]:
    """The dotted path of the first string in ``value`` that holds a lone surrogate, else None.

    >>> lone_surrogate({"ids": ["a", "\\ud800"]}, "candidates")
    'candidates.ids.1'
    """
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, BaseModel):
        items = ((k, getattr(value, k)) for k in type(value).model_fields)
    elif isinstance(value, dict):
        items = iter(value.items())
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = lone_surrogate(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None
