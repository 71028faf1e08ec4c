"""MLflow helpers: the embedded sqlite default, one run per training run, the model registry
with its honest ``champion`` rule, MLflow pyfunc models, and :func:`resolve`, the one way a model
REF becomes a local checkpoint plus the registry version it named.

No Ray here; nothing happens at import.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from genseg.errors import InputError

RUN_NAME_TAG = "genseg.run_name"
JOB_TAG = "genseg.job"               # "train seg", "tune seg", ...: what made the run
CHAMPION = "champion"
# tags on a registered model version
SCORE_NAME_TAG = "genseg.score_name"
SCORE_TAG = "genseg.score"
DATA_TAG = "genseg.data_fingerprint"
SPLIT_TAG = "genseg.scored_on"
SAMPLING_TAG = "genseg.sampling"
WEIGHTS_TAG = "genseg.weights_sha256"
PYFUNC_CHECKPOINT = "checkpoint"      # the artifact name of the checkpoint inside a pyfunc model


class RefError(InputError):
    """A model REF that names nothing usable."""


def default_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


class TrackingServerError(InputError):
    """An http(s) tracking URI that does not answer as an MLflow server."""


def bounded_retries() -> None:
    """MLflow retries a failing HTTP request for minutes by default (7 retries, 120 s timeouts); a
    server that went away should end a command within a minute.  The user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_server(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) tracking URI: one request to the server's ``/health`` (a few seconds at
    most), so a wrong or unreachable URI is one line naming it, not minutes of retries."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    bounded_retries()
    where = f"the MLflow tracking server {uri} (--tracking-uri / $MLFLOW_TRACKING_URI)"
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            body = r.read(64).decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise TrackingServerError(f"{where} refused us (HTTP {exc.code}): set MLFLOW_TRACKING_USERNAME and "
                                      f"MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN") from None
        raise TrackingServerError(f"{where} answered HTTP {exc.code} to /health: is it an MLflow server "
                                  f"(`mlflow server`)?") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", None) or exc
        why = getattr(why, "strerror", None) or str(why) or type(exc).__name__
        raise TrackingServerError(f"cannot reach {where}: {why}") from None
    if body != "OK":
        raise TrackingServerError(f"{where} answered /health with {body[:40]!r}, not MLflow's 'OK': is it an "
                                  f"MLflow server?")


def setup(workdir: str | Path, tracking_uri: str | None = None) -> str:
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def display_uri(uri: str) -> str:
    """A tracking URI to print or write down: without a ``user:password@`` in it."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else uri


def experiment_id(name: str, workdir: str | Path) -> str:
    """Get or create an experiment whose artifacts live under ``<workdir>/mlartifacts``."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if mlflow.get_tracking_uri().startswith(("http://", "https://")):
        return mlflow.create_experiment(name)   # the server's artifact store (`--artifacts-destination`)
    location = (Path(workdir).resolve() / "mlartifacts" / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def find_run(exp_id: str, run_name: str, job: str | None = None):
    """The newest MLflow run of a genseg run name, or None.  ``job`` (e.g. "tune seg"): only a run
    that job made (or one from before runs said which job made them), so a search and a training
    run that share a name are two runs."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                      max_results=100)
    return next((r for r in runs if job is None or r.data.tags.get(JOB_TAG, job) == job), None)


def start_or_resume_run(exp_id: str, run_name: str, params: dict, tags: dict | None = None) -> tuple[str, bool]:
    """Return ``(run_id, resumed)``.  Re-running a name continues the same MLflow run (of the same
    job, ``tags["genseg.job"]``, where given)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = find_run(exp_id, run_name, (tags or {}).get(JOB_TAG))
    resumed = run is not None
    if run is None:
        run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
    else:
        client.update_run(run.info.run_id, status="RUNNING")
    have = run.data.params if resumed else {}
    flat = flatten(params)
    # a param cannot change in MLflow: record new fields, and the latest full config as JSON
    from mlflow.entities import Param

    new = [Param(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(new), 90):
        client.log_batch(run.info.run_id, params=new[i: i + 90])
    changed = {k: v for k, v in flat.items() if k in have and have[k] != v}
    if changed:
        client.set_tag(run.info.run_id, "genseg.changed_on_resume", json.dumps(changed)[:4000])
    client.log_dict(run.info.run_id, params, "config.json")
    return run.info.run_id, resumed


def flatten(d: dict) -> dict[str, str]:
    return {k: ("None" if v is None else str(list(v) if isinstance(v, tuple) else v))[:500] for k, v in d.items()}


# ------------------------------------------------------------------ resolving a model REF

@dataclass(frozen=True)
class ResolvedModel:
    """A model REF after ONE lookup: where its checkpoint is on disk, and which registry version,
    run and alias it named at that moment (so a champion switch cannot split the two)."""

    ref: str
    path: Path                          # local checkpoint directory
    name: str | None = None             # registered model name
    version: int | None = None
    run_id: str | None = None
    alias: str | None = None
    tags: dict = field(default_factory=dict)

    @property
    def sampling(self):
        """Sampling settings stored on the registry version (e.g. by tuning), or None."""
        from genseg.generation import SamplingSettings

        text = self.tags.get(SAMPLING_TAG)
        return SamplingSettings.from_dict(json.loads(text)) if text else None

    @property
    def label(self) -> str:
        """``name/version`` for a registry model, else the REF as given."""
        if self.name and self.version:
            return f"{self.name}/{self.version}"
        return str(self.ref)

    def describe(self) -> str:
        if self.version is None:
            return self.ref if self.run_id is None else f"{self.ref} (run {self.run_id})"
        return f"{self.ref} (version {self.version}, run {self.run_id})"

    def to_dict(self) -> dict:
        return {"ref": self.ref, "path": str(self.path), "name": self.name, "version": self.version,
                "run_id": self.run_id, "alias": self.alias}


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is_run_id(ref: str) -> bool:
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)


def resolve(ref: str, tracking_uri: str | None = None, dst: str | Path | None = None,
            default_artifact: str = "best_checkpoint") -> ResolvedModel:
    """``models:/name@alias``, ``models:/name/N``, an MLflow run id or a checkpoint directory ->
    :class:`ResolvedModel`, with a single registry lookup.  Artifacts are downloaded into ``dst``
    (a fresh temporary directory when None: the caller owns it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    path = Path(ref)
    if path.is_dir():
        return ResolvedModel(ref, _checkpoint_in(path))
    if ref.startswith("models:/"):
        spec = ref[len("models:/"):]
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = None
        elif "/" in spec:
            name, version = spec.split("/", 1)
            alias = None
            if not version.isdigit():
                raise RefError(f"model URI {ref!r}: the version must be a number, e.g. models:/{name}/1")
        else:
            raise RefError(f"model URI {ref!r} needs an alias or a version, e.g. models:/{spec}@{CHAMPION}")
        client = _client(tracking_uri)
        try:
            mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
            local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=_dst(dst),
                                                        tracking_uri=tracking_uri)
        except MlflowException as exc:
            raise RefError(f"model {ref!r} not found in {tracking_uri or 'the tracking store'} "
                           f"({exc.message.splitlines()[0]})") from None
        return ResolvedModel(ref, _checkpoint_in(Path(local)), name, int(mv.version), mv.run_id, alias,
                             dict(mv.tags or {}))
    if _is_run_id(ref):
        client = _client(tracking_uri)
        try:
            client.get_run(ref)
            names = {a.path for a in client.list_artifacts(ref)}
            artifact = default_artifact if default_artifact in names else "checkpoint"
            local = mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=artifact, dst_path=_dst(dst),
                                                        tracking_uri=tracking_uri)
        except MlflowException as exc:
            raise RefError(f"model {ref!r} not found in {tracking_uri or 'the tracking store'} "
                           f"({exc.message.splitlines()[0]})") from None
        return ResolvedModel(ref, _checkpoint_in(Path(local)), run_id=ref)
    if path.exists():
        raise RefError(f"model {ref!r} is a file, not a checkpoint directory")
    raise RefError(f"model {ref!r} is neither a checkpoint directory, an MLflow run id, nor a models:/ URI")


def _checkpoint_in(path: Path) -> Path:
    """A registered version is an MLflow pyfunc model holding the checkpoint as its ``checkpoint``
    artifact (the MLmodel file says where); older versions point at the checkpoint directory itself."""
    mlmodel = path / "MLmodel"
    if not mlmodel.is_file():
        return path
    import yaml

    try:
        doc = yaml.safe_load(mlmodel.read_text()) or {}
        rel = doc["flavors"]["python_function"]["artifacts"][PYFUNC_CHECKPOINT]["path"]
    except (KeyError, TypeError, yaml.YAMLError):
        raise RefError(f"{path} is an MLflow model without a genseg checkpoint artifact") from None
    return path / rel


def _dst(dst):
    if dst is None:
        return tempfile.mkdtemp(prefix="genseg-model-")
    Path(dst).mkdir(parents=True, exist_ok=True)
    return str(dst)


# ------------------------------------------------------------------ the registry and its champion

@dataclass(frozen=True)
class Score:
    """The figure a version competes on.  ``name`` must mean the same thing for every version of a
    model (e.g. ``val_miou``; for diffusion the schedule-independent ``val_x0_mse``)."""

    name: str
    value: float | None
    higher_is_better: bool = True

    @property
    def valid(self) -> bool:
        return isinstance(self.value, (int, float)) and math.isfinite(self.value)


def check_margin(margin: float) -> float:
    """``margin`` as a float if it is a finite number >= 0 (the champion rule's), else a ValueError."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"the champion margin must be a finite number >= 0, got {margin!r}")
    return float(margin)


# gains within this of the margin are rounding, not more than it: 0.3542 - 0.3442 is 0.010000000000000009
_ROUNDING = 1e-9


def decide_champion(new: Score, new_data: str, new_split: str, current: dict | None,
                    promote: bool = False, new_weights: str | None = None,
                    margin: float = 0.0) -> tuple[bool, str]:
    """The champion rule -> (take the alias?, why).  ``current`` is the champion's tags or None.

    * a NaN, infinite or missing score never takes the alias, not even with ``promote``;
    * a version competes only with a champion scored on the same data (fingerprint), split and
      score; otherwise the champion is kept, and ``promote`` overrides;
    * a version with the champion's very weights (``new_weights``, the digest of its weight
      files) replaces it: it differs only in what was stored with it, e.g. tuned sampling settings;
    * on the same footing the better score wins, by more than ``margin`` (in the score's units, e.g.
      0.01 mIoU: a gain inside the run-to-run noise of the recipe should not move the alias); a tie,
      or a gain of at most ``margin``, keeps the champion."""
    margin = check_margin(margin)
    if not new.valid:
        return False, f"its {new.name} is {new.value!r}, not a finite number: it never takes the alias"
    if current is None:
        return True, "there was no champion"
    if promote:
        return True, "--promote was given"
    cur_data, cur_split = current.get(DATA_TAG), current.get(SPLIT_TAG)
    cur_name = current.get(SCORE_NAME_TAG)
    if cur_data is None or cur_name is None:
        return False, ("the champion has no data fingerprint or score name (registered by an older genseg), "
                       "so the two are not comparable; pass --promote to replace it")
    if cur_name != new.name:
        return False, (f"the champion is scored on {cur_name}, this version on {new.name}: not comparable; "
                       "pass --promote to replace it")
    if cur_data != new_data or cur_split != new_split:
        return False, (f"the champion was scored on other data ({cur_split} of data {cur_data[:12]}, this "
                       f"version on {new_split} of data {new_data[:12]}); pass --promote to replace it")
    if new_weights is not None and current.get(WEIGHTS_TAG) == new_weights:
        return True, "it holds the champion's own weights (with newer settings stored with them, e.g. tuned sampling)"
    try:
        cur = float(current.get(SCORE_TAG, "nan"))
    except ValueError:
        cur = float("nan")
    if not math.isfinite(cur):
        return True, f"the champion's {new.name} is not a finite number"
    gain = new.value - cur if new.higher_is_better else cur - new.value
    if gain > margin + _ROUNDING:
        return True, (f"{new.name} {new.value:.6g} beats the champion's {cur:.6g}"
                      + (f" by {gain:.6g}, more than the margin {margin:g}" if margin else ""))
    if gain > _ROUNDING:
        return False, (f"{new.name} {new.value:.6g} beats the champion's {cur:.6g} by {gain:.6g}, "
                       f"not by more than the margin {margin:g}")
    return False, f"{new.name} {new.value:.6g} does not beat the champion's {cur:.6g}"


def register(run_id: str, artifact_path: str, model_name: str, score: Score, *, data_fingerprint: str,
             scored_on: str, data_desc: str = "", promote: bool = False, sampling: dict | None = None,
             tracking_uri: str | None = None, weights_digest: str | None = None,
             extra_tags: dict | None = None, margin: float = 0.0) -> dict:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``model_name`` with its score,
    data fingerprint and sampling settings as tags; give it the ``champion`` alias by
    :func:`decide_champion`.  Returns what happened and why."""
    from mlflow.exceptions import MlflowException

    check_margin(margin)             # before anything is registered
    client = _client(tracking_uri)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(model_name)
        except MlflowException:   # another run created it in the meantime
            client.get_registered_model(model_name)
    tags = {SCORE_NAME_TAG: score.name, SCORE_TAG: repr(score.value) if score.valid else "nan",
            DATA_TAG: data_fingerprint, SPLIT_TAG: scored_on, "genseg.data": data_desc[:500]}
    if score.valid:
        tags[score.name] = f"{score.value:.6f}"
    if sampling:
        tags[SAMPLING_TAG] = json.dumps(sampling, sort_keys=True)
    if weights_digest:
        tags[WEIGHTS_TAG] = weights_digest
    tags.update(extra_tags or {})
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        current = None
    take, why = decide_champion(score, data_fingerprint, scored_on,
                                None if current is None else dict(current.tags or {}), promote, weights_digest,
                                margin)
    if take:
        client.set_registered_model_alias(model_name, CHAMPION, mv.version)
    prev_score = None
    if current is not None:
        try:
            prev_score = float(current.tags.get(SCORE_TAG, current.tags.get(score.name, "nan")))
        except ValueError:
            prev_score = None
    return {"name": model_name, "version": int(mv.version), "champion": take, "reason": why,
            "score": score.value, "score_name": score.name,
            "previous_champion": None if current is None else int(current.version),
            "previous_score": prev_score}


# ------------------------------------------------------------------ MLflow pyfunc models

def save_pyfunc(checkpoint_dir: str | Path, out_dir: str | Path, kind: str) -> Path:
    """Write an MLflow pyfunc model (models-from-code: ``genseg/mlflow_model.py``, no pickled
    objects) that holds ``checkpoint_dir`` as its artifact, with a tensor signature."""
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    if kind == "segmenter":
        sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "images")]),
                             outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "labels")]))
    else:
        from mlflow.types.schema import ParamSchema, ParamSpec

        sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1), "label_maps")]),
                             outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "images")]),
                             params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("num", "long", 0)] + (
                                 [ParamSpec("truncation", "double", -1.0)] if kind == "gan" else
                                 [ParamSpec("sampler", "string", ""), ParamSpec("steps", "long", 0),
                                  ParamSpec("guidance", "double", -1.0)])))
    import warnings

    code = Path(__file__).with_name("mlflow_model.py")
    with warnings.catch_warnings():   # advice about type hints and input examples, not problems
        warnings.simplefilter("ignore", UserWarning)
        _save_model(code, checkpoint_dir, out_dir, sig, kind)
    return Path(out_dir)


def _save_model(code, checkpoint_dir, out_dir, sig, kind) -> None:
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(path=str(out_dir), python_model=str(code),
                             artifacts={PYFUNC_CHECKPOINT: str(checkpoint_dir)}, signature=sig,
                             pip_requirements=["genseg"], metadata={"genseg.kind": kind})
