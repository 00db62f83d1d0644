"""How a trained booster becomes an MLflow model: signature, input example, requirements, ``log_model``.

``churn train`` and ``churn tune --register-best`` both log their model through
``log_model``, so a model logged by either is the same artifact.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from churnlib import tracking
from churnlib.data.features import FeatureSpec
from churnlib.data.sources import CSV_NULLS
from churnlib.model.files import DECISION_COLUMNS, OUTPUT_COLUMNS
from churnlib.model.predictor import save_model_dir

if TYPE_CHECKING:
    from churnlib.config import Config


def numeric_types(source: Any, spec: FeatureSpec, missing: dict[str, int] | None = None) -> dict[str, str]:
    """The MLflow type of each numeric input: ``long`` where the training table holds integers
    with no missing value, ``double`` elsewhere (what ``mlflow.models.infer_signature`` gives
    for the same table read by pandas).

    The integer test reads the first file's types (Parquet: its schema; CSV: Arrow's inference
    on its first 8 MB, with churn's missing-value markers); ``missing`` is the validation
    report's count of missing cells per column over the whole table (a column with holes is a
    float column to pandas, so it is ``double``)."""
    import pyarrow as pa

    missing = missing or {}
    path = source.files[0]
    if source.format == "parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path, filesystem=source.filesystem)
    else:
        import pyarrow.csv as pacsv

        with source.filesystem.open_input_stream(path, compression="detect") as stream:
            schema = pacsv.open_csv(
                stream, read_options=pacsv.ReadOptions(block_size=8 << 20),
                convert_options=pacsv.ConvertOptions(include_columns=list(spec.numeric), null_values=CSV_NULLS),
            ).schema
    names = set(schema.names)
    return {c: "long" if c in names and pa.types.is_integer(schema.field(c).type) and not missing.get(c) else "double"
            for c in spec.numeric}


def signature_for(spec: FeatureSpec, types: dict[str, str] | None = None):
    """Input schema: every feature column required; numeric ones ``long`` or ``double`` as
    ``numeric_types`` found them in the training table (default ``double``), categorical ones
    strings.

    MLflow enforces it before the model sees a record: it casts int32 and 0/1 int64 to double,
    refuses float for long and int64 for double (with its hint on missing values); inside, the
    model takes every numeric input as a number (``to_matrix``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    types = types or {}
    inputs = [ColSpec(types.get(c, "double"), c) for c in spec.numeric] + [
        ColSpec("string", c) for c in spec.categorical_columns
    ]
    outputs = [ColSpec("double", OUTPUT_COLUMNS[0]), ColSpec("long", OUTPUT_COLUMNS[1]),
               ColSpec("double", DECISION_COLUMNS[0]), ColSpec("boolean", DECISION_COLUMNS[1])]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def input_example(raw: pd.DataFrame, spec: FeatureSpec, types: dict[str, str] | None = None,
                  rows: int = 3) -> pd.DataFrame:
    """A few raw records, typed as the signature says (a ``long`` column with a hole in these
    rows: the rows without one)."""
    types = types or {}
    ex = raw[spec.input_columns].copy()
    longs = [c for c in spec.numeric if types.get(c) == "long"]
    for c in spec.numeric:
        ex[c] = pd.to_numeric(ex[c], errors="coerce").astype("float64")
    ex = ex.dropna(subset=longs).head(rows)
    for c in longs:
        ex[c] = ex[c].astype("int64")
    for c in spec.categorical_columns:
        ex[c] = ex[c].astype(object)
    return ex.reset_index(drop=True)


def log_model(cfg: Config, spec: Any, source: Any, columns: list[str], booster: Any, best: int, run_id: str,
               profile: dict[str, Any] | None = None, contact: dict[str, Any] | None = None,
               missing: dict[str, int] | None = None) -> str:
    """Feature importance (JSON + PNG), the booster and the raw-records pyfunc model, into the active run.

    ``contact``: the contact threshold chosen at training (``churnlib.train.decide``); without it
    the model contacts above the break-even probability of its decision. ``missing``: the
    validation report's missing cells per column (for the signature's types)."""
    import mlflow

    from churnlib.model.pyfunc import ChurnModel

    tracking.log_importance(booster, spec.feature_names)
    with tempfile.TemporaryDirectory(prefix="churn-") as tmp:
        tmpdir = Path(tmp)
        meta = {
            "decision_threshold": cfg.model.decision_threshold,
            "model_name": cfg.model.name,
            "best_iteration": best,
            "feature_names": spec.feature_names,
            "run_id": run_id,
            "data_digest": source.digest,
            # what a contact is worth, for the model's own expected_value and contact outputs
            # how the booster's margin becomes the probability answered (churnlib.model.calibration)
            "calibration": (contact or {}).get("calibration") or {"method": "none"},
            "decision": {**{k: getattr(cfg.decision, k) for k in ("value_saved", "contact_cost", "save_rate")},
                         **({"threshold": contact["threshold"], "threshold_source": contact["source"]}
                            if contact is not None else {})},
        }
        model_dir = save_model_dir(tmpdir / "model_dir", booster, spec, meta, profile)
        types = numeric_types(source, spec, missing)
        if profile is not None:
            mlflow.log_dict(profile, "data/profile.json")
        mlflow.log_artifact(str(model_dir / "booster.ubj"), artifact_path="booster")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ChurnModel(),
            artifacts={"model_dir": str(model_dir)},
            signature=signature_for(spec, types),
            input_example=input_example(sample_rows(source, columns, 50), spec, types),
            pip_requirements=requirements(),
            metadata={"churn_feature_spec": spec.to_dict(), "decision_threshold": cfg.model.decision_threshold},
            # MLflow links the run's metrics at this step to the model: the learning curves'
            # values at the best iteration (at step 0 the model showed round 1's)
            step=int(best),
        )
    return info.model_uri


def sample_rows(source: Any, columns: list[str], n: int = 5):
    """A few raw rows for the model's input example, read straight from the first file."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = source.files[0]
    if source.format == "parquet":
        pf = pq.ParquetFile(source.filesystem.open_input_file(path))
        return next(pf.iter_batches(batch_size=n, columns=columns)).to_pandas()
    with source.filesystem.open_input_stream(path, compression="detect") as stream:
        reader = pacsv.open_csv(stream, convert_options=pacsv.ConvertOptions(include_columns=columns))
        return reader.read_next_batch().to_pandas().head(n)


def package_version(package: str) -> str:
    """The installed version of ``package``, or ``unknown``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def requirements() -> list[str]:
    """The pip requirements a logged model declares (the versions installed here)."""
    return [
        f"{pkg}=={package_version(pkg)}"
        for pkg in ("mlflow", "xgboost", "pandas", "numpy", "pyarrow", "pyyaml", "pydantic")
        if package_version(pkg) != "unknown"
    ]
