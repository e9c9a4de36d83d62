"""The HTTP API's request and response models (pydantic only: no faiss, no torch).

They are the OpenAPI schema the router publishes at /openapi.json. What a model
cannot know (the index's dimension, its stored and filterable fields, the server's
batch limit) is checked by the router against the version it serves, with the same
kind of error: a 4xx naming the field.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from shards.search.filters import MAX_CLAUSES, MAX_IN_VALUES
from shards.search.router import K_MAX

MAX_QUERY_CHARS = 8192   # one text query; the encoder truncates far earlier, this bounds the payload

Text = Annotated[str, Field(max_length=MAX_QUERY_CHARS)]

_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_CONDITION = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "description": "eq, in, or a range (any of gt, gte, lt, lte)",
    "properties": {"eq": _SCALAR, "in": {"type": "array", "items": _SCALAR, "minItems": 1,
                                         "maxItems": MAX_IN_VALUES},
                   **{op: {"type": "number"} for op in ("gt", "gte", "lt", "lte")}},
}
FILTER_SCHEMA = {
    "anyOf": [{"type": "object", "maxProperties": MAX_CLAUSES,
               "additionalProperties": {"anyOf": [*_SCALAR["anyOf"], _CONDITION]}}, {"type": "null"}],
    "description": "conditions on stored attributes, all of which must hold: "
                   '{"lang": "en", "year": {"gte": 2000, "lt": 2010}, "tag": {"in": ["a", "b"]}}',
}
# The schema documents the filter's grammar; the values are checked by shards.search.filters.parse_filter
# against the served version's fields, so every mistake is named as filter.<field>[.<operator>].
Filter = Annotated[dict[str, Any] | None, WithJsonSchema(FILTER_SCHEMA)]


class SearchRequest(BaseModel):
    """Either `queries` or `vectors` (not both)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"queries": ["how do I read a csv file"], "k": 5},
        {"vectors": [[0.1, 0.2, 0.3]], "k": 10, "nprobe": 16, "filter": {"year": {"gte": 2000}}},
    ]})

    queries: list[Text] | None = Field(None, min_length=1, description="text queries, encoded with the index's "
                                       "own encoder")
    vectors: list[list[float]] | None = Field(None, min_length=1, description="query vectors of the index's "
                                              "dimension")
    k: int = Field(10, ge=1, le=K_MAX, description="results per query")
    nprobe: int | None = Field(None, ge=1, le=1 << 20, description="IVF lists to probe; default: the "
                               "version's tuned nprobe")
    refine: int | None = Field(None, ge=0, le=1000, description="with a refine store: each shard reranks its k x "
                               "refine best by exact distance; 0: no rerank; default: the version's tuned factor")
    filter: Filter = None
    fields: list[str] | None = Field(None, description="stored fields to return; default: all of them")

    def filter_spec(self) -> dict | None:
        return self.filter


class HitModel(BaseModel):
    id: int | str
    score: float
    fields: dict


class ShardsReport(BaseModel):
    queried: int = Field(description="shards this request was sent to")
    answered: int = Field(description="shards that answered in time; fewer than queried means a partial answer")
    missing: list[str] = Field(description="the shards that did not answer")
    touched: list[int] = Field(description="per query, the shards it was sent to (IVF routing sends fewer)")


class SearchResponse(BaseModel):
    version: str
    results: list[list[HitModel]]
    shards: ShardsReport
    took_ms: float


class ErrorResponse(BaseModel):
    error: str = Field(description="one line, starting with the field at fault")
    field: str | None = None
