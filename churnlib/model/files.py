"""The names of the files in a model's ``model_dir`` and of its outputs, in one place.

Every stage that writes or reads a model folder (training, packaging, loading,
the Serve loaders) takes the names from here.
"""

from __future__ import annotations

PROFILE_FILE = "data_profile.json"


BOOSTER_FILE = "booster.ubj"


SPEC_FILE = "feature_spec.json"


META_FILE = "model_meta.json"


OUTPUT_COLUMNS = ("churn_probability", "churn_label")
# ... and, for a model that carries its decision (trained since the decision layer):
# the expected net value of contacting the customer, and whether to contact them
DECISION_COLUMNS = ("expected_value", "contact")
