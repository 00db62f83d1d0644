"""The one feature function: deterministic, order-independent, strict on bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from churnlib.config import load_config
from churnlib.data.features import FeatureSpec, encode_target, to_matrix
from churnlib.data.generation import iter_chunks
from churnlib.errors import FeatureError

pytestmark = pytest.mark.unit  # no Ray, no server, no database


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return FeatureSpec.from_config(load_config(env={}).features)


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    return next(iter_chunks(2000, seed=3))


def test_matrix_layout(spec, raw):
    X = to_matrix(raw, spec)
    assert X.dtype == np.float32 and X.shape == (2000, 10)
    assert spec.feature_names[:7] == list(spec.numeric)
    assert spec.feature_types == ["q"] * 7 + ["c"] * 3
    np.testing.assert_array_equal(X[:, 0], raw["Age"].to_numpy(dtype=np.float32))
    # levels coded in config order: Monthly 0, Quarterly 1, Annual 2
    contract = X[:, spec.feature_names.index("Contract Length")]
    expected = raw["Contract Length"].map({"Monthly": 0, "Quarterly": 1, "Annual": 2}).to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(contract, expected)


def test_codes_do_not_depend_on_which_rows_are_seen(spec, raw):
    """A worker that sees only 'Annual' rows still codes Annual as 2."""
    full = to_matrix(raw, spec)
    annual = raw[raw["Contract Length"] == "Annual"]
    part = to_matrix(annual, spec)
    np.testing.assert_array_equal(part, full[raw["Contract Length"].to_numpy() == "Annual"])
    assert set(np.unique(part[:, spec.feature_names.index("Contract Length")])) == {2.0}
    shuffled = raw.sample(frac=1.0, random_state=1)
    np.testing.assert_array_equal(to_matrix(shuffled, spec), full[shuffled.index.to_numpy()])


def test_same_values_whatever_the_input_types(spec, raw):
    """Ints, floats, numeric strings, a dict, a list of dicts: the same matrix."""
    X = to_matrix(raw.head(5), spec)
    as_text = raw.head(5).astype(str)
    np.testing.assert_array_equal(to_matrix(as_text, spec), X)
    np.testing.assert_array_equal(to_matrix(raw.head(5).to_dict("records"), spec), X)
    np.testing.assert_array_equal(to_matrix(raw.iloc[0].to_dict(), spec), X[:1])
    padded = raw.head(5).copy()
    padded["Gender"] = " " + padded["Gender"] + " "
    np.testing.assert_array_equal(to_matrix(padded, spec), X)


def test_empty_cells_are_missing_not_errors(spec, raw):
    df = raw.head(4).copy().astype(object)
    df.loc[0, "Age"] = None
    df.loc[1, "Total Spend"] = " "
    df.loc[2, "Gender"] = ""
    df.loc[3, "Tenure"] = np.nan
    X = to_matrix(df, spec)
    assert np.isnan(X[0, 0]) and np.isnan(X[1, spec.feature_names.index("Total Spend")])
    assert np.isnan(X[2, spec.feature_names.index("Gender")]) and np.isnan(X[3, 1])
    assert np.isfinite(X[0, 1:]).all()


def test_unknown_category_names_column_count_and_row(spec, raw):
    df = raw.head(10).copy()
    df.loc[3, "Subscription Type"] = "Platinum"
    df.loc[7, "Subscription Type"] = "Gold"
    with pytest.raises(FeatureError) as err:
        to_matrix(df, spec)
    msg = str(err.value)
    assert "'Subscription Type'" in msg and "2 unknown categories" in msg and "row 3" in msg and "'Platinum'" in msg
    assert err.value.column == "Subscription Type" and err.value.rows == [3, 7]


def test_non_numeric_and_missing_column(spec, raw):
    df = raw.head(5).copy().astype(object)
    df.loc[2, "Support Calls"] = "many"
    with pytest.raises(FeatureError, match="'Support Calls': 1 non-numeric value.*row 2.*'many'"):
        to_matrix(df, spec)
    with pytest.raises(FeatureError, match="missing column.*'Tenure'"):
        to_matrix(raw.drop(columns=["Tenure"]), spec)
    inf = raw.head(2).copy().astype(object)
    inf.loc[0, "Age"] = "inf"
    with pytest.raises(FeatureError, match="'Age'"):
        to_matrix(inf, spec)


@pytest.mark.parametrize(
    ("values", "positive", "negative", "expected"),
    [
        ([1, 0, 1], 1, 0, [1, 0, 1]),
        ([True, False], 1, 0, [1, 0]),
        (["true", "FALSE", "1", "0.0"], 1, 0, [1, 0, 1, 0]),
        (["Yes", "no", " YES "], "Yes", "No", [1, 0, 1]),
        ([1.0, 0.0], 1, 0, [1, 0]),
    ],
)
def test_target_encodings(values, positive, negative, expected):
    spec = FeatureSpec(("a",), (), "t", positive, negative)
    labels, invalid = encode_target(pd.Series(values), spec)
    assert labels.tolist() == expected and not invalid.any()


def test_target_outside_the_two_classes_is_invalid():
    spec = FeatureSpec(("a",), (), "t", "Yes", "No")
    labels, invalid = encode_target(pd.Series(["Yes", "maybe", None, "No", 2]), spec)
    assert invalid.tolist() == [False, True, True, False, True]
    spec01 = FeatureSpec(("a",), (), "t", 1, 0)
    _, invalid = encode_target(pd.Series([0, 1, 2, -1]), spec01)
    assert invalid.tolist() == [False, False, True, True]


def test_spec_round_trips_through_json(spec):
    again = FeatureSpec.from_json(spec.to_json())
    assert again == spec and again.feature_names == spec.feature_names


def test_records_fast_path_agrees_with_the_dataframe_path(spec):
    """Lists of dicts skip pandas when every cell is plain; the answer (or error) is the same."""
    import random

    from churnlib.data.features import _records_fast

    rng = random.Random(3)
    plain_numbers = [None, float("nan"), 0, 7, -3, 2.5, 1e9 + 1, 16777217]
    odd_numbers = ["12", " 4 ", "", "abc", True, float("inf")]
    plain_levels = {c: list(lv) + [None, float("nan"), " Male "] for c, lv in spec.categorical}
    odd_levels = ["", "n/a", "Unknown", 3]

    def cell(plain: list, odd: list):
        return rng.choice(odd) if rng.random() < 0.03 else rng.choice(plain)

    fast_used = 0
    for _ in range(400):
        rows = []
        for _ in range(rng.randint(1, 4)):
            r = {c: cell(plain_numbers, odd_numbers) for c in spec.numeric}
            r.update({c: cell(v, odd_levels) for c, v in plain_levels.items()})
            if rng.random() < 0.1:
                r.pop(rng.choice(spec.feature_names))
            rows.append(r)
        fast_used += _records_fast(rows, spec) is not None
        try:
            expected = to_matrix(pd.DataFrame(rows), spec)
        except FeatureError as exc:
            with pytest.raises(FeatureError) as info:
                to_matrix(rows, spec)
            assert str(info.value) == str(exc)
            continue
        np.testing.assert_array_equal(to_matrix(rows, spec), expected)
    assert fast_used > 20  # the fast path really ran, not only the fallback
