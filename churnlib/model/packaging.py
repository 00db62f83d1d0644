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
from churnlib.model.files import DECISION_COLUMNS, OUTPUT_COLUMNS
from churnlib.model.predictor import save_model_dir

if TYPE_CHECKING:
    from churnlib.config import Config


def signature_for(spec: FeatureSpec):
    """Input schema: every feature column required; categorical ones are strings.

    Numeric columns are typed ``Any``: MLflow's enforcement refuses int64 where
    it expects double, and real tables carry integer ages and tenures. Their
    values are checked by ``to_matrix`` (numbers, numeric strings or empty).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    inputs = [ColSpec(AnyType(), c) for c in spec.numeric] + [
        ColSpec("string", c) for c in spec.categorical_columns
    ]
    outputs = [ColSpec("double", OUTPUT_COLUMNS[0]), ColSpec("long", OUTPUT_COLUMNS[1]),
               ColSpec("double", DECISION_COLUMNS[0]), ColSpec("boolean", DECISION_COLUMNS[1])]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def input_example(raw: pd.DataFrame, spec: FeatureSpec, rows: int = 3) -> pd.DataFrame:
    """A few raw records, typed as the signature says."""
    ex = raw[spec.input_columns].head(rows).copy()
    for c in spec.numeric:
        ex[c] = pd.to_numeric(ex[c], errors="coerce").astype("float64")
    for c in spec.categorical_columns:
        ex[c] = ex[c].astype(object)
    return ex.reset_index(drop=True)


def log_model(cfg: Config, spec: Any, source: Any, columns: list[str], booster: Any, best: int, run_id: str,
               profile: dict[str, Any] | None = None, contact: dict[str, Any] | None = None) -> str:
    """Feature importance (JSON + PNG), the booster and the raw-records pyfunc model, into the active run.

    ``contact``: the contact threshold chosen at training (``churnlib.train.decide``); without it
    the model contacts above the break-even probability of its decision."""
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
        if profile is not None:
            mlflow.log_dict(profile, "data/profile.json")
        mlflow.log_artifact(str(model_dir / "booster.ubj"), artifact_path="booster")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ChurnModel(),
            artifacts={"model_dir": str(model_dir)},
            signature=signature_for(spec),
            input_example=input_example(sample_rows(source, columns), spec),
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
