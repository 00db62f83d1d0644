"""Every MLflow tag name the project writes or reads, in one place.

Runs, registered versions and the Serve loaders agree on these names; a tag is
renamed here or nowhere. Prefixes (``churn.gate.``, ``churn.eval.``, ``train.``)
are how versions carry a copy of their evaluation and training summary.
"""

from __future__ import annotations

# What wrote a run, and what it used
TAG_COMMAND = "churn.command"  # train, evaluate, predict, drift, tune, tune-trial
TAG_RESUMED_FROM = "churn.resumed_from"
TAG_ENGINE = "churn.train_engine"  # where the boosting ran: task (one Ray task) or ray_train
TAG_DRIFT_REFERENCE = "churn.drift.reference"

# An evaluation run: what it evaluated and against what (the registry reads them)
TAG_TRAINING_RUN = "churn.training_run_id"
TAG_MODEL_URI = "churn.model_uri"
TAG_MODEL_NAME = "churn.model_name"
TAG_MODEL_VERSION = "churn.model_version"
TAG_BASELINE_URI = "churn.baseline_uri"
TAG_BASELINE_VERSION = "churn.baseline_version"
TAG_BASELINE_NAME = "churn.baseline_name"
TAG_VERDICT = "churn.comparison.verdict"

# Gates: on the evaluation run and copied onto the registry version
TAG_GATE_PREFIX = "churn.gate."
TAG_GATE_STATUS = "churn.gate.status"
TAG_GATE_SUMMARY = "churn.gate.summary"
TAG_GATE_SOURCE = "churn.gate.source"  # on a version: which evaluation run (and data) set its gate
TAG_EVAL_PREFIX = "churn.eval."  # a version's copy of its evaluation metrics
TAG_EVAL_RUN = "churn.eval.run_id"
TAG_TRAIN_PREFIX = "train."  # a version's copy of its training metrics

# Registry versions and the registered model
TAG_PROJECT = "churn.project"
TAG_REGISTERED_BY = "churn.registered_by"
TAG_REGISTERED_AT = "churn.registered_at"
TAG_PROMOTED_AT = "churn.promoted_at"
TAG_PROMOTED_BY = "churn.promoted_by"
TAG_PROMOTED_FROM = "churn.promoted_from"
TAG_FORCED = "churn.promotion.forced"
TAG_ROLLED_BACK = "churn.rolled_back"
# A version's retention decision re-derived for new costs (`churn models decide`), one JSON
# tag: value_saved, contact_cost, save_rate, threshold, threshold_source, ... The loaders apply
# it over the decision the model was trained with.
TAG_DECISION = "churn.decision"
# A live rollout on a registered model (churnlib.rollout.state): mode, share, challenger version
TAG_ROLLOUT = "churn.rollout"
TAG_PROMOTED_LIVE = "churn.promotion.live"
# A rollout's MLflow run
TAG_ROLLOUT_MODE = "churn.rollout.mode"
TAG_ROLLOUT_OUTCOME = "churn.rollout.outcome"  # promoted, aborted, replaced
TAG_ROLLOUT_CHALLENGER = "churn.rollout.challenger"
TAG_ROLLOUT_CHAMPION = "churn.rollout.champion"  # on a version promoted by a rollout: its live evidence

# A `churn monitor` run: the range it covers and how many alerts it raised
TAG_MONITOR_SINCE = "churn.monitor.since"
TAG_MONITOR_UNTIL = "churn.monitor.until"
TAG_MONITOR_ALERTS = "churn.monitor.alerts"

# Tune: the sweep's parent run and its trial runs
TAG_SWEEP = "churn.sweep"
TAG_TRIAL = "churn.trial_id"
TAG_TRIAL_STATUS = "churn.trial.status"
TAG_BEST_TRIAL_RUN = "churn.best_trial_run_id"
TAG_BEST_TRIAL = "churn.best_trial_id"
TAG_REGISTERED_VERSION = "churn.registered_version"
