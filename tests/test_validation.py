"""Serve's request validation as a pure function of the body: no Ray, no server, no model."""

from __future__ import annotations

import json

import pytest

from churnlib.config import load_config
from churnlib.data.features import FeatureSpec
from serve.validation import FLOAT32_MAX, Limits, RequestError, Validator

pytestmark = pytest.mark.unit

SPEC = FeatureSpec.from_config(load_config(env={}).features)
GOOD = {"CustomerID": 7, "Age": 30, "Gender": "Female", "Tenure": 12, "Usage Frequency": 5, "Support Calls": 1,
        "Payment Delay": 3, "Subscription Type": "Basic", "Contract Length": "Annual", "Total Spend": 512.5,
        "Last Interaction": 4}


def body(*records: dict, single: bool = True) -> bytes:
    return json.dumps(records[0] if single else list(records)).encode()


def refused(validator: Validator, data: bytes, **kw) -> RequestError:
    with pytest.raises(RequestError) as info:
        validator.parse(data, **kw)
    return info.value


def test_a_good_record_and_a_list():
    v = Validator(SPEC)
    one = v.parse(body(GOOD))
    assert one.single and one.ids == [7] and "CustomerID" not in one.records[0] and one.records[0]["Age"] == 30
    many = v.parse(body(GOOD, {**GOOD, "CustomerID": "c-9", "Age": None}, single=False))
    assert not many.single and many.ids == [7, "c-9"] and many.records[1]["Age"] is None


@pytest.mark.parametrize(("field", "value", "message"), [
    ("Age", 1e39, "record 0, field 'Age': out of range: the model holds numbers up to 3.403e+38 in size (float32)"),
    ("Age", -1e39, "record 0, field 'Age': out of range"),
    ("Age", True, "record 0, field 'Age': Input should be a valid number"),
    ("Age", "30", "record 0, field 'Age': Input should be a valid number"),
    ("CustomerID", False, "record 0, field 'CustomerID': the customer id must be a string or an integer"),
    ("Gender", "Robot", "record 0, field 'Gender': Input should be 'Female' or 'Male'"),
    ("Promo Code", "X1", "record 0, field 'Promo Code': unknown field"),
])
def test_bad_values_are_422_naming_the_field(field, value, message):
    """Issue: 1e39 passed /predict silently and made /explain answer 500; booleans were numbers;
    unknown fields were dropped silently."""
    error = refused(Validator(SPEC), body({**GOOD, field: value}))
    assert error.status == 422 and error.message.startswith(message), error.message
    assert error.errors[0]["field"] == field and error.errors[0]["record"] == 0
    assert len([e for e in error.errors if e["field"] == field]) == 1


def test_float32_limit_itself_is_fine():
    assert Validator(SPEC).parse(body({**GOOD, "Total Spend": FLOAT32_MAX})).records[0]["Total Spend"] == FLOAT32_MAX


def test_unknown_fields_can_be_allowed_and_the_target_always_is():
    assert Validator(SPEC).parse(body({**GOOD, "Churn": 1})).records[0].get("Churn") is None  # replayed labelled rows
    ignoring = Validator(SPEC, Limits(unknown_fields="ignore"))
    assert "Promo Code" not in ignoring.parse(body({**GOOD, "Promo Code": "X1"})).records[0]


def test_body_and_record_limits_are_413():
    v = Validator(SPEC, Limits(max_records=5, max_explain_records=2, max_body_bytes=4096))
    padded = body({**GOOD, "Churn": "x" * 5000})  # one record, padded past the body limit
    assert refused(v, padded).status == 413 and "serve.max_body_bytes" in refused(v, padded).message
    with pytest.raises(RequestError) as info:
        v.check_size(50 * 2**20)  # the Content-Length alone is enough to refuse
    assert info.value.status == 413
    six = body(*[GOOD] * 6, single=False)
    assert refused(v, six).status == 413 and "at most 5 (serve.max_records)" in refused(v, six).message
    three = body(*[GOOD] * 3, single=False)
    assert v.parse(three).records
    error = refused(v, three, max_records=2, setting="serve.max_explain_records")
    assert error.status == 413 and error.message.endswith("at most 2 (serve.max_explain_records)")


@pytest.mark.parametrize("data", [b"{not json", b"42", b"", b'["a record?"]', b"[]"])
def test_malformed_bodies_are_422(data):
    assert refused(Validator(SPEC), data).status == 422


def test_schema_documents_fields_and_limits():
    v = Validator(SPEC, Limits(max_records=9), descriptions={"Age": "years"})
    schema = v.schema()
    one = schema["anyOf"][0]
    assert set(one["required"]) == set(SPEC.feature_names)
    assert one["properties"]["Age"]["description"] == "years"
    assert schema["anyOf"][1]["maxItems"] == 9
