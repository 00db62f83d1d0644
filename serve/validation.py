"""Request bodies -> validated records: a pure function of the bytes, no Ray, no model.

``Validator(spec, limits).parse(body)`` parses and checks a JSON body in one
pass of pydantic-core and returns the records (plain dicts, ready for
``churnlib.data.features.to_matrix``), the customer ids and whether one record (an
object) or a list came in. Every refusal is a ``RequestError`` with its HTTP
status and a body naming the record and the field:

- 413 when the body is larger than ``serve.max_body_bytes`` or holds more
  records than the endpoint allows (``serve.max_records``; ``/explain``:
  ``serve.max_explain_records``, smaller, as it costs ~100 times more);
- 422 for everything else: not JSON, not an object or a list, an empty list, a
  missing feature, a number that is not a JSON number (a string, a boolean), a
  number outside what the model's float32 matrix holds (|x| > 3.4e38) or not
  finite, a category the config does not list, an id that is neither a string
  nor an integer, a field the schema does not know (``serve.unknown_fields:
  reject``; ``ignore`` drops them). The target column is always allowed (and
  ignored), so labelled rows can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np

# The largest magnitude a float32 model matrix holds; beyond it a value becomes inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class RequestError(Exception):
    """A client error with its HTTP status and a JSON body."""

    def __init__(self, status: int, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors or []

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.message}
        if self.errors:
            out["errors"] = self.errors
        return out


@dataclass(frozen=True)
class Limits:
    """What one request may hold (from ``serve.*``)."""

    max_records: int = 10000
    max_explain_records: int = 1000
    max_body_bytes: int = 8 * 2**20
    unknown_fields: str = "reject"  # or "ignore"

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "Limits":
        return cls(**{k: settings[k] for k in ("max_records", "max_explain_records", "max_body_bytes",
                                               "unknown_fields") if k in settings})


def record_type(spec: Any, unknown_fields: str = "reject", descriptions: dict[str, str] | None = None,
                example: dict[str, Any] | None = None):
    """The type of one raw record, from the feature spec (a TypedDict keyed by column name).

    Every feature is required (a key may hold null: a missing value); numbers
    must be JSON numbers (not strings or booleans), finite and within float32;
    categories must be one of the configured levels; the id column is optional
    and passes through; the target column is allowed and ignored; other keys
    are refused or ignored (``unknown_fields``). Each field's title is the
    column's own name (``CustomerID``, not pydantic's "Customerid"); its
    description (meaning, unit) and the record's example come from
    ``features.descriptions`` and ``features.example``.
    """
    from pydantic import ConfigDict, Field, StrictInt, StrictStr
    from typing_extensions import NotRequired, TypedDict

    descriptions = descriptions or {}
    fields: dict[str, Any] = {}
    number = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
    for col in spec.numeric:
        fields[col] = Annotated[Optional[number], Field(title=col, description=descriptions.get(col))]
    for col, levels in spec.categorical:
        fields[col] = Annotated[Optional[Literal[tuple(levels)]], Field(title=col, description=descriptions.get(col))]  # type: ignore[misc]
    if spec.id_column:
        fields[spec.id_column] = NotRequired[Annotated[Optional[Union[StrictInt, StrictStr]], Field(
            title=spec.id_column, description=descriptions.get(spec.id_column) or "customer id, echoed in the answer"
                                              " (optional)")]]
    if spec.target and spec.target not in fields:
        fields[spec.target] = NotRequired[Annotated[Any, Field(title=spec.target,
                                                               description="the label, if known: ignored")]]
    record = TypedDict("CustomerRecord", fields)  # type: ignore[misc]
    extra: dict[str, Any] = {"title": "CustomerRecord",
                             "description": "One customer in the raw schema: column names and category strings as in "
                                            "the training table; null is a missing value."}
    if example:
        extra["examples"] = [example]
    record.__pydantic_config__ = ConfigDict(  # type: ignore[attr-defined]
        extra="forbid" if unknown_fields == "reject" else "ignore", json_schema_extra=extra)
    return record


@dataclass
class Parsed:
    """Validated records: their ids and the rows to score, in request order."""
    records: list[dict]
    ids: list
    single: bool


class Validator:
    """Request bodies -> validated records, parsed and checked by pydantic-core in one pass."""

    def __init__(self, spec: Any, limits: Limits | None = None, descriptions: dict[str, str] | None = None,
                 example: dict[str, Any] | None = None):
        from pydantic import TypeAdapter

        self.limits = limits or Limits()
        self.example = example
        one = record_type(spec, self.limits.unknown_fields, descriptions, example)
        self.record = TypeAdapter(one)
        self.records = TypeAdapter(list[one])  # type: ignore[valid-type]
        self.id_column = spec.id_column
        self.target = spec.target

    def schema(self, max_records: int | None = None) -> dict[str, Any]:
        one = self.record.json_schema()
        many = {"type": "array", "items": one, "minItems": 1, "maxItems": max_records or self.limits.max_records}
        return {"anyOf": [one, many]}

    def check_size(self, length: int) -> None:
        """413 for a body over ``max_body_bytes`` (called with the Content-Length, then the bytes read)."""
        if length > self.limits.max_body_bytes:
            raise RequestError(413, f"the body is {length} bytes; at most {self.limits.max_body_bytes} "
                                    f"(serve.max_body_bytes)")

    def parse(self, body: bytes, max_records: int | None = None, setting: str = "serve.max_records") -> Parsed:
        """-> the records, customer ids and single?, or RequestError (413/422) naming record and field."""
        from pydantic import ValidationError

        self.check_size(len(body))
        limit = max_records or self.limits.max_records
        start = body.lstrip()[:1]
        if start == b"{":
            adapter, single = self.record, True
        elif start == b"[":
            # records hold scalars only: more '{' than allowed records is too many, before any parsing
            if body.count(b"{") > limit:
                raise RequestError(413, f"more than {limit} records in one request; at most {limit} ({setting})")
            adapter, single = self.records, False
        else:
            raise RequestError(422, "send one record (a JSON object) or a list of records (a JSON array)")
        try:
            parsed = adapter.validate_json(body)
        except ValidationError as exc:
            raise self._error(exc, single) from None
        records = [parsed] if single else parsed
        if not records:
            raise RequestError(422, "empty list: send one record or a list of at least one record")
        if len(records) > limit:
            raise RequestError(413, f"{len(records)} records in one request; at most {limit} ({setting})")
        if self.target:
            for r in records:
                r.pop(self.target, None)
        ids = [r.pop(self.id_column, None) for r in records] if self.id_column else [None] * len(records)
        return Parsed(records, ids, single)

    def _error(self, exc: Any, single: bool) -> RequestError:
        errors = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = list(err.get("loc") or ())
            if err["type"] == "json_invalid":
                return RequestError(422, f"the body is not valid JSON: {err['msg']}")
            index = loc.pop(0) if not single and loc and isinstance(loc[0], int) else 0
            if not single and not loc and err["type"] != "list_type":
                field = None
            else:
                field = str(loc[0]) if loc else None
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                message = "unknown field (not in the model's schema; serve.unknown_fields: ignore accepts it)"
            elif err["type"] in ("less_than_equal", "greater_than_equal"):
                message = f"out of range: the model holds numbers up to {FLOAT32_MAX:.4g} in size (float32)"
            elif field is not None and field == self.id_column:
                if any(e.get("record") == index and e.get("field") == field for e in errors):
                    continue  # one line for the id, not one per type it could have been
                message, err = "the customer id must be a string or an integer", {**err, "type": "id_type"}
            errors.append({"record": index, "field": field, "message": message, "type": err["type"]})
        first = errors[0]
        where = f"record {first['record']}" + (f", field {first['field']!r}" if first["field"] else "")
        return RequestError(422, f"{where}: {first['message']}", errors)
