"""MLflow helpers: the embedded sqlite default, one run per training run, the model registry
with its ``champion`` alias, and resolving a model REF to a local checkpoint directory.

No Ray here; nothing happens at import.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from genseg.errors import InputError

RUN_NAME_TAG = "genseg.run_name"
CHAMPION = "champion"


class RefError(InputError):
    """A model REF that names nothing usable."""


def default_tracking_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def setup(workdir: str | Path, tracking_uri: str | None = None) -> str:
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def experiment_id(name: str, workdir: str | Path) -> str:
    """Get or create an experiment whose artifacts live under ``<workdir>/mlartifacts``."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (Path(workdir).resolve() / "mlartifacts" / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def find_run(exp_id: str, run_name: str):
    """The MLflow run of a genseg training run name, or None."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient().search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                      max_results=2)
    return runs[0] if runs else None


def start_or_resume_run(exp_id: str, run_name: str, params: dict, tags: dict | None = None) -> tuple[str, bool]:
    """Return ``(run_id, resumed)``.  Re-running a name continues the same MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = find_run(exp_id, run_name)
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


def register(run_id: str, artifact_path: str, model_name: str, score_name: str, score: float,
             higher_is_better: bool = True) -> dict:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``model_name``; give it
    the ``champion`` alias when ``score`` beats the current champion's."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(model_name, source=source, run_id=run_id,
                                     tags={score_name: f"{score:.6f}"})
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION)
        current_score = float(current.tags.get(score_name, "nan"))
    except MlflowException:
        current, current_score = None, float("nan")
    if higher_is_better:
        promoted = current is None or not (current_score >= score)   # NaN-safe: NaN never wins
    else:
        promoted = current is None or not (current_score <= score)
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, mv.version)
    return {"name": model_name, "version": int(mv.version), "champion": promoted,
            "previous_champion": None if current is None else int(current.version),
            "previous_score": None if current is None else current_score}


def resolve_ref(ref: str, default_artifact: str = "checkpoint", dst: str | Path | None = None) -> Path:
    """A checkpoint directory, an MLflow run id or a ``models:/name@alias`` / ``models:/name/N``
    URI -> a local checkpoint directory."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    path = Path(ref)
    if path.is_dir():
        return path
    client = MlflowClient()
    try:
        if ref.startswith("models:/"):
            source = _model_version(client, ref).source
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=_dst(dst)))
        if all(c in "0123456789abcdef" for c in ref) and len(ref) == 32:
            client.get_run(ref)
            return Path(mlflow.artifacts.download_artifacts(run_id=ref, artifact_path=default_artifact,
                                                            dst_path=_dst(dst)))
    except MlflowException as exc:
        raise RefError(f"model {ref!r} not found in the tracking store ({exc.message.splitlines()[0]})") from None
    raise RefError(f"model {ref!r} is neither a checkpoint directory, an MLflow run id, nor a models:/ URI")


def _model_version(client, ref: str):
    spec = ref[len("models:/"):]
    if "@" in spec:
        name, alias = spec.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    if "/" in spec:
        name, version = spec.split("/", 1)
        return client.get_model_version(name, version)
    raise RefError(f"model URI {ref!r} needs an alias or version, e.g. models:/{spec}@champion")


def describe_ref(ref: str) -> str:
    """A model reference for reports: a ``models:/`` URI gains the version and run it points at now."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not ref.startswith("models:/"):
        return ref
    try:
        mv = _model_version(MlflowClient(), ref)
    except (MlflowException, RefError):
        return ref
    return f"{ref} (version {mv.version}, run {mv.run_id})"


def _dst(dst):
    if dst is None:
        return None
    Path(dst).mkdir(parents=True, exist_ok=True)
    return str(dst)
