"""The search space, the search algorithm and the scheduler of a sweep, from the ``tune`` config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from churnlib.config import XGB_MAXIMIZE, Config
from churnlib.train.loop import score_key

if TYPE_CHECKING:
    from churnlib.config import TuneSettings


def search_space(tune_cfg: TuneSettings) -> dict[str, Any]:
    """``tune.search_space`` -> Ray Tune distributions, keyed by XGBoost parameter."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, d in tune_cfg.search_space.items():
        if d.distribution == "uniform":
            space[key] = tune.uniform(d.low, d.high)
        elif d.distribution == "loguniform":
            space[key] = tune.loguniform(d.low, d.high)
        elif d.distribution == "randint":
            space[key] = tune.randint(int(d.low), int(d.high) + 1)  # Tune's upper bound is exclusive
        else:
            space[key] = tune.choice(list(d.values))
    return space


def with_params(cfg: Config, params: dict[str, Any]) -> Any:
    """The config with a trial's XGBoost parameters (validated like any config)."""
    data = cfg.model_dump()
    data["xgboost"] = {**data["xgboost"], **{k: v for k, v in params.items() if k in data["xgboost"]}}
    return Config.model_validate(data)


def objective(cfg: Config) -> tuple[str, str]:
    """The metric Tune optimises (the early-stopping metric) and its mode."""
    stopping = cfg.xgboost.early_stopping_metric
    return score_key(stopping), "max" if stopping.split("@")[0] in XGB_MAXIMIZE else "min"


def concurrency(cfg: Config, requested: int | None) -> int:
    """Trials at once: what the cluster fits (workers x CPUs, GPUs), or fewer if asked."""
    import ray

    total = ray.cluster_resources()
    per_trial_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    fits = int(total.get("CPU", 0) // per_trial_cpu) if per_trial_cpu else 1
    if cfg.ray.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // cfg.ray.num_workers))
    fits = max(1, fits)
    return min(fits, requested) if requested else fits


def searcher(cfg: Config, max_concurrent: int):
    """The search algorithm, limited to ``max_concurrent`` trials at once.

    (Tune's ``max_concurrent_trials`` is silently ignored for a
    BasicVariantGenerator passed in, so the limit is set here, on both.)"""
    if cfg.tune.search == "optuna":
        import logging

        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # Optuna sets its logger to INFO when it is first imported (just now): keep the level
        # `churn` chose for Ray Tune's (quiet unless --verbose), so "A new study created" stays off
        logging.getLogger("optuna").setLevel(logging.getLogger("ray.tune").getEffectiveLevel())

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.tune.seed), max_concurrent=max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=max_concurrent)


def scheduler(cfg: Config):
    """ASHA on the reported rounds, or none (``tune.scheduler``)."""
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="rounds", max_t=cfg.xgboost.num_boost_round, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor)
