"""The model registry lifecycle: register, aliases, gated promotion, rollback.

Aliases and tags only (MLflow stages are deprecated). The aliases the system
uses are ``staging`` (candidate), ``champion`` (what serving answers with),
``production`` (free for a team's own use) and ``previous`` (the champion
before the last promotion: what ``rollback`` returns to).

``promote`` moves ``champion`` only when the version's LATEST evaluation (the
newest finished ``churn evaluate`` run of the version's training run) passed
its gates and, when there is a champion already, an evaluation compared it
with THAT champion and did not find it significantly worse (with
``evaluation.require_improvement``: found it significantly better). Everything
is checked before the first alias moves; a refusal changes nothing and exits 3.
``--force`` overrides a refusal explicitly: the reasons are recorded on the
version (``churn.promotion.forced``). The promoted version leaves ``staging``
(it is no longer a candidate). ``rollback`` to a version whose latest
evaluation failed its gates needs ``--force`` too.

Concurrency: on a local store (SQLite or files) promotions and rollbacks take
an exclusive file lock, so two racing processes run one after the other. On a
tracking server there is no lock to take (MLflow has no transactions on
aliases); there every alias write still points at a version that passed its
gates, which is the invariant that matters, and the command re-reads the
aliases afterwards and reports a lost race.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from churnlib import tracking
from churnlib.console import say as default_say
from churnlib.errors import PromotionRefusedError, RegistryError, TrackingError
from churnlib.evaluate.record import version_tags
from churnlib.model.loading import logged_model_uri
from churnlib.tags import (
    TAG_BASELINE_NAME,
    TAG_BASELINE_VERSION,
    TAG_COMMAND,
    TAG_EVAL_PREFIX,
    TAG_FORCED,
    TAG_GATE_SOURCE,
    TAG_GATE_STATUS,
    TAG_GATE_SUMMARY,
    TAG_PROJECT,
    TAG_PROMOTED_AT,
    TAG_PROMOTED_BY,
    TAG_PROMOTED_FROM,
    TAG_PROMOTED_LIVE,
    TAG_REGISTERED_AT,
    TAG_REGISTERED_BY,
    TAG_ROLLED_BACK,
    TAG_TRAIN_PREFIX,
    TAG_TRAINING_RUN,
    TAG_VERDICT,
)

if TYPE_CHECKING:
    from churnlib.config import Config

STAGING, CHAMPION, PRODUCTION, PREVIOUS = "staging", "champion", "production", "previous"
SYSTEM_ALIASES = (STAGING, CHAMPION, PRODUCTION, PREVIOUS)

# Training metrics copied onto a version when it is registered: what the versions
# table shows (the training run holds every other one).
KEY_METRICS = ("best_valid_auc",)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """MLflow failures inside a registry command -> one line (not found: exit 2; anything else: exit 1)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        first = (str(exc.message).strip().splitlines() or ["?"])[0][:300]
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{what}: {first}") from None
        if getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE":
            raise RegistryError(f"{what}: {first}") from None
        raise TrackingError(f"{what}: MLflow: {first}") from None
    except OSError as exc:
        raise TrackingError(f"{what}: {exc}") from None


@dataclass
class VersionInfo:
    """One registry version as people read it: aliases, gate status, metrics, source run."""
    name: str
    version: str
    aliases: list[str]
    run_id: str | None
    created: str
    source: str
    description: str
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, mv: Any) -> "VersionInfo":
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mv.creation_timestamp / 1000)) if mv.creation_timestamp else ""
        return cls(
            name=mv.name, version=str(mv.version), aliases=sorted(mv.aliases or []), run_id=mv.run_id, created=created,
            source=mv.source, description=mv.description or "", tags=dict(mv.tags or {}),
        )

    @property
    def auc(self) -> tuple[float | None, str]:
        """The latest evaluation's ROC AUC if there is one, else the training validation AUC."""
        for key, kind in ((f"{TAG_EVAL_PREFIX}roc_auc", "eval"), (f"{TAG_TRAIN_PREFIX}best_valid_auc", "valid")):
            if key in self.tags:
                try:
                    return float(self.tags[key]), kind
                except ValueError:
                    pass
        return None, ""

    @property
    def gate(self) -> str:
        return self.tags.get(TAG_GATE_STATUS, "not evaluated")

    def to_dict(self) -> dict[str, Any]:
        auc, kind = self.auc
        return {"name": self.name, "version": self.version, "aliases": self.aliases, "run_id": self.run_id,
                "created": self.created, "source": self.source, "description": self.description,
                "auc": auc, "auc_source": kind, "gate": self.gate, "tags": self.tags}


class Registry:
    """The registered model ``model.registered_name`` on the configured registry."""

    def __init__(self, cfg: Config, say: Callable[[str], None] = default_say):
        from mlflow import MlflowClient

        tracking.connect(cfg)  # a server that is down: one line, exit 1, before anything
        self.cfg = cfg
        self.name = cfg.model.registered_name
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.registry_uri)
        self.say = say

    # Reading -----------------------------------------------------------------------------

    def version(self, version: str | int) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        with mlflow_errors(f"{self.name} version {version}"):
            try:
                return VersionInfo.of(self.client.get_model_version(self.name, str(version)))
            except MlflowException as exc:
                if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise RegistryError(f"{self.name} has no version {version}") from None
                raise

    def alias(self, alias: str) -> VersionInfo | None:
        """The version behind ``alias``, or None when the alias (or the model) does not exist."""
        from mlflow.exceptions import MlflowException

        with mlflow_errors(f"{self.name}@{alias}"):
            try:
                return VersionInfo.of(self.client.get_model_version_by_alias(self.name, alias))
            except MlflowException as exc:
                if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    return None
                raise

    def versions(self) -> list[VersionInfo]:
        with mlflow_errors(f"listing {self.name}"):
            found = self.client.search_model_versions(f"name = '{self.name}'")
        # search results do not carry aliases on every store: take them from the registered model
        by_version: dict[str, list[str]] = {}
        for alias, version in self.aliases().items():
            by_version.setdefault(version, []).append(alias)
        out = []
        for mv in found:
            info = VersionInfo.of(mv)
            info.aliases = sorted(by_version.get(info.version, []))
            out.append(info)
        return sorted(out, key=lambda v: int(v.version), reverse=True)

    def aliases(self) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        with mlflow_errors(f"reading {self.name}"):
            try:
                rm = self.client.get_registered_model(self.name)
            except MlflowException as exc:
                if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                    return {}
                raise
        return {a: str(v) for a, v in (rm.aliases or {}).items()}

    def latest_evaluation(self, run_id: str, baseline_version: str | None = None) -> Any | None:
        """The newest finished `churn evaluate` run of a training run (any experiment); with
        ``baseline_version``, the newest one compared with that version of this registered model."""
        import mlflow

        compared = (f" and tags.`{TAG_BASELINE_VERSION}` = '{baseline_version}' and tags.`{TAG_BASELINE_NAME}` = "
                    f"'{self.name}'") if baseline_version is not None else ""
        with mlflow_errors(f"searching evaluations of run {run_id}"):
            runs = mlflow.search_runs(
                search_all_experiments=True,
                filter_string=(
                    f"tags.`{TAG_TRAINING_RUN}` = '{run_id}' and tags.`{TAG_COMMAND}` = 'evaluate' "
                    f"and attributes.status = 'FINISHED'{compared}"
                ),
                order_by=["attributes.start_time DESC"],
                max_results=1,
                output_format="list",
            )
        return runs[0] if runs else None

    # Writing ------------------------------------------------------------------------------

    def register(self, run_id: str, alias: str | None = None, description: str | None = None) -> tuple[VersionInfo, bool]:
        """A version from the run's model (the existing one when the run is already registered).

        -> (version, created). The version is created with all its tags in one
        call, so a failure never leaves a half-tagged version behind.
        """
        from mlflow.exceptions import MlflowException

        if alias is not None:
            _check_alias_name(alias)
        source = logged_model_uri(run_id)  # one line when the run or its model does not exist
        with mlflow_errors(f"registering run {run_id}"):
            existing = self.client.search_model_versions(f"name = '{self.name}' and run_id = '{run_id}'")
            if existing:
                mv = min(existing, key=lambda v: int(v.version))
                info, created = VersionInfo.of(mv), False
            else:
                try:
                    self.client.create_registered_model(self.name, tags={TAG_PROJECT: "churn-prediction"})
                except MlflowException as exc:
                    if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                        raise
                mv = self.client.create_model_version(
                    self.name, source=source, run_id=run_id, tags=self._registration_tags(run_id),
                    description=description, model_id=source.split("/")[-1],
                )
                info, created = VersionInfo.of(mv), True
            self._link(source.split("/")[-1], info.version)
            if alias is not None:
                self.client.set_registered_model_alias(self.name, alias, info.version)
                info = self.version(info.version)
        return info, created

    def _link(self, model_id: str, version: str) -> None:
        """Name the version on the logged model (``mlflow.modelVersions``), as ``mlflow.register_model``
        does: the model's page in the MLflow UI then shows the version instead of "Not registered"."""
        import json

        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        entry = {"name": self.name, "version": str(version)}
        current = json.loads(self.client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        if entry not in current:
            self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*current, entry])})

    def _registration_tags(self, run_id: str) -> dict[str, str]:
        run = self.client.get_run(run_id)
        found = {k: tracking.run_metric(run.data.metrics, k) for k in KEY_METRICS}
        tags = {f"train.{k}": f"{v:.6g}" for k, v in found.items() if v is not None}
        for key in ("data.digest", "data.source"):
            if key in run.data.tags:
                tags[key] = run.data.tags[key]
        tags[TAG_REGISTERED_BY] = _who()
        tags[TAG_REGISTERED_AT] = _now()
        latest = self.latest_evaluation(run_id)
        if latest is not None:
            tags.update(version_tags(latest.data.tags, latest.data.metrics, latest.info.run_id))
        return tags

    def set_alias(self, version: str | int, alias: str) -> VersionInfo:
        _check_alias_name(alias)
        self.version(version)  # one line when the version does not exist
        with mlflow_errors(f"setting {self.name}@{alias}"):
            self.client.set_registered_model_alias(self.name, alias, str(version))
        return self.version(version)

    def delete_alias(self, alias: str) -> str:
        current = self.alias(alias)
        if current is None:
            raise RegistryError(f"{self.name} has no alias {alias!r}")
        with mlflow_errors(f"deleting {self.name}@{alias}"):
            self.client.delete_registered_model_alias(self.name, alias)
        return current.version

    # Promotion ----------------------------------------------------------------------------

    def promote(self, version: str | int | None = None, force: bool = False, live: str | None = None,
                forced: list[str] | None = None) -> dict[str, Any]:
        """``live``: the evidence of a rollout (`churn rollout promote`, which checked its own
        criteria, ``forced`` its refusals overridden): it stands in for the offline check and is
        recorded on the version."""
        with self._lock():
            if version is None:
                staged = self.alias(STAGING)
                if staged is None:
                    raise RegistryError(f"{self.name} has no {STAGING!r} version: give --version N or set the alias first")
                target = staged
            else:
                target = self.version(version)
            champion = self.alias(CHAMPION)
            if champion is not None and champion.version == target.version:
                self.say(f"promote: version {target.version} is already {CHAMPION}; nothing to do")
                if champion.gate == "failed":
                    self.say(f"promote: warning: its latest evaluation failed its gates "
                             f"({champion.tags.get(TAG_GATE_SOURCE, 'source unknown')})")
                return {"version": target.version, "previous": None, "changed": False}
            if live is None:
                evidence, refusals = self._check_promotion(target, champion)
            else:
                evidence, refusals = None, list(forced or [])
            if refusals and not force:
                raise PromotionRefusedError(f"refused: {refusals[0]}")
            if refusals:
                self.say(f"promote: promoting anyway (--force): {'; '.join(refusals)}")
            # Everything checked: now the aliases move (previous first, so a
            # failure in between leaves champion where it was).
            with mlflow_errors(f"promoting {self.name} version {target.version}"):
                if champion is not None:
                    self.client.set_registered_model_alias(self.name, PREVIOUS, champion.version)
                self.client.set_registered_model_alias(self.name, CHAMPION, target.version)
                staged = self.alias(STAGING)
                if staged is not None and staged.version == target.version:
                    # a promoted version is no longer a candidate
                    self.client.delete_registered_model_alias(self.name, STAGING)
                stamp = {TAG_PROMOTED_AT: _now(), TAG_PROMOTED_BY: _who(),
                         TAG_PROMOTED_FROM: champion.version if champion is not None else "none"}
                if refusals:
                    stamp[TAG_FORCED] = (f"forced by {stamp[TAG_PROMOTED_BY]} at {stamp[TAG_PROMOTED_AT]}: "
                                         f"{'; '.join(refusals)}")[:5000]
                if live is not None:
                    stamp[TAG_PROMOTED_LIVE] = live
                for key, value in stamp.items():
                    self.client.set_model_version_tag(self.name, target.version, key, value)
        after = self.alias(CHAMPION)
        if after is None or after.version != target.version:
            self.say(f"promote: another promotion moved {CHAMPION} to version {after.version if after else 'none'} meanwhile")
        return {
            "version": target.version,
            "previous": champion.version if champion is not None else None,
            "changed": True,
            "forced": bool(refusals),
            "evaluation_run_id": evidence.info.run_id if evidence is not None else None,
        }

    def _check_promotion(self, target: VersionInfo, champion: VersionInfo | None) -> tuple[Any | None, list[str]]:
        """-> (the version's latest evaluation, or None; what refuses the promotion, one line each)."""
        if not target.run_id:
            raise RegistryError(f"{self.name} version {target.version} has no source run to find its evaluation")
        refusals: list[str] = []
        evaluation = self.latest_evaluation(target.run_id)
        if evaluation is None:
            refusals.append(
                f"{self.name} version {target.version} has no evaluation on record "
                f"(run churn evaluate --model-uri models:/{self.name}/{target.version} --data ..., or give --force)")
        else:
            tags = evaluation.data.tags
            status = tags.get(TAG_GATE_STATUS)
            if status != "passed":
                refusals.append(
                    f"the latest evaluation of {self.name} version {target.version} (run {evaluation.info.run_id} "
                    f"on {tags.get('data.source', '?')}) failed its gates: {tags.get(TAG_GATE_SUMMARY, status or 'no gate result')}")
        if champion is None:
            return evaluation, refusals
        # Over an existing champion: an evaluation compared with THAT champion, not significantly worse.
        compared = self.latest_evaluation(target.run_id, baseline_version=champion.version)
        if compared is None:
            refusals.append(
                f"no evaluation of version {target.version} was compared with the current champion (version "
                f"{champion.version}); evaluate with --compare-baseline models:/{self.name}@{CHAMPION}")
            return evaluation, refusals
        verdict = compared.data.tags.get(TAG_VERDICT, "not compared")
        measured = compared.data.metrics
        diff = tracking.run_metric(measured, "diff_roc_auc")
        low, high = tracking.run_metric(measured, "auc_diff_ci_low"), tracking.run_metric(measured, "auc_diff_ci_high")
        shown = f" (AUC {diff:+.4f}, CI [{low:+.4f}, {high:+.4f}], run {compared.info.run_id})" if None not in (diff, low, high) else ""
        if verdict == "worse":
            refusals.append(f"version {target.version} is significantly worse than the champion (version "
                            f"{champion.version}){shown}")
        elif self.cfg.evaluation.require_improvement and verdict != "better":
            refusals.append(f"version {target.version} is {verdict} compared with the champion (version "
                            f"{champion.version}){shown}; evaluation.require_improvement asks for significantly better")
        return evaluation, refusals

    def rollback(self, force: bool = False) -> dict[str, Any]:
        """``champion`` back to ``previous``; the demoted version is tagged as rolled back. A
        ``previous`` whose latest evaluation failed its gates needs ``force``."""
        with self._lock():
            champion, previous = self.alias(CHAMPION), self.alias(PREVIOUS)
            if previous is None:
                raise RegistryError(f"{self.name} has no {PREVIOUS!r} version to roll back to")
            if champion is not None and champion.version == previous.version:
                raise RegistryError(f"{CHAMPION} and {PREVIOUS} are both version {previous.version}: nothing to roll back")
            if previous.gate == "failed":
                why = (f"version {previous.version}'s latest evaluation failed its gates "
                       f"({previous.tags.get(TAG_GATE_SOURCE, 'source unknown')}): "
                       f"{previous.tags.get(TAG_GATE_SUMMARY, '')}")
                if not force:
                    raise PromotionRefusedError(f"refused: rollback to {why}; give --force to roll back anyway")
                self.say(f"rollback: rolling back anyway (--force): {why}")
            # The version before `previous` (if it is still a sound one) becomes the new `previous`.
            earlier = previous.tags.get(TAG_PROMOTED_FROM)
            with mlflow_errors(f"rolling back {self.name}"):
                self.client.set_registered_model_alias(self.name, CHAMPION, previous.version)
                if champion is not None:
                    self.client.set_model_version_tag(
                        self.name, champion.version, TAG_ROLLED_BACK,
                        f"rolled back to version {previous.version} by {_who()} at {_now()}",
                    )
                next_previous = None
                if earlier and earlier not in ("none", previous.version) and (champion is None or earlier != champion.version):
                    candidate = self.client.get_model_version(self.name, earlier)
                    if TAG_ROLLED_BACK not in (candidate.tags or {}):
                        next_previous = earlier
                if next_previous:
                    self.client.set_registered_model_alias(self.name, PREVIOUS, next_previous)
                else:
                    self.client.delete_registered_model_alias(self.name, PREVIOUS)
        return {"champion": previous.version, "demoted": champion.version if champion else None, "previous": next_previous}

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive across processes for a local store; a no-op for a server (see module doc)."""
        uri = self.cfg.registry_uri
        if uri.startswith("sqlite:///"):
            lock_path = Path(uri[len("sqlite:///"):] + ".registry.lock")
        elif uri.startswith("file:") or "://" not in uri:
            lock_path = Path(uri.removeprefix("file://").removeprefix("file:")) / ".registry.lock"
        else:
            yield
            return
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _check_alias_name(alias: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_\-]+", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(
            f"invalid alias {alias!r}: letters, digits, '_' and '-' only, not 'latest' or a version like 'v3'"
        )

