"""``genseg tune diffusion|seg``: searches on Ray Tune, over the same runner and metrics as
``train`` and ``eval gen``, that leave the winner registered and ready to serve.

``tune diffusion`` has two stages, run in order (``--stage`` picks one):

* **schedule** (training-time): each trial is a Ray Train run of ``train diffusion`` (the Train V2
  pattern: the trial function builds the trainer through :func:`jobs.runner.run`, which reports
  through ``TuneReportCallback``), stopped early by ASHA on ``val_x0_mse``.  That score is the
  EMA model's error in predicting x0 at fixed noise levels with fixed noise
  (``genseg.diffusion.score``): one parameterization (x0) at the same signal-to-noise points for
  every schedule, T and prediction type, so trials are comparable where the raw loss is not (an
  eps loss and a v loss of the same model differ by a timestep-dependent factor), and it costs
  one forward pass per val image, not a sampling run.
* **sampling** (no training): sampler, steps and guidance weight ``w`` on the best checkpoint,
  each trial drawing the same label maps with the same seed and scored as ``eval gen`` scores
  (segmenter features; real-image features are computed once, in the driver, and shared).  The
  :class:`genseg.tuning.Objective` says what "best" means and is printed with the result.

``tune seg`` searches the segmentation recipe (learning rate, loss, class weighting, crop, ...)
with ASHA on val mIoU through the same code path.

Each search is resumable: rerun it with the same ``--name`` and finished trials are kept, not
rerun (``Tuner.restore``); a finished stage is not searched again.  The restored search keeps the
settings it was started with, so a rerun asking for others is refused (:func:`check_same_search`).
The winner is registered as a new model version (the diffusion winner with its tuned sampling
settings stored in the checkpoint and on the version) and takes ``champion`` under the usual rule.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genseg import config as config_lib
from genseg.errors import InputError
from genseg.tuning import Objective, SearchSpace, SpaceError, TrialRow, format_table, rank
from jobs.runtime import DATA_TASK_CPU, check_room_for_data, local_cpus

TUNE_TAG = "genseg.tune"
STATUS_TAG = "genseg.tune.status"
PARENT_TAG = "mlflow.parentRunId"

DEFAULT_SPACES: dict[str, dict] = {
    # every schedule with each prediction type: 8 trials at the config's epochs
    "schedule": {"schedule": ["linear", "scaled_linear", "cosine", "sigmoid"], "prediction": ["epsilon", "v_prediction"]},
    # w from unconditional to strong guidance, for the two fast samplers: 10 trials
    "sampling": {"guidance": [0.0, 1.0, 2.0, 3.0, 5.0], "sampler": ["ddim", "dpmpp"], "steps": [20]},
    "seg": {"lr": [1e-3, 2e-3, 4e-3], "loss": ["ce", "ce_dice"], "class_weights": ["none", "median-freq"]},
}
# what each stage may search (training stages: config fields that change the recipe, not the data)
SCHEDULE_FIELDS = ("schedule", "timesteps", "beta_start", "beta_end", "prediction", "p_uncond", "ema_decay", "lr",
                   "weight_decay", "warmup_epochs", "lr_schedule", "batch_size", "channels", "layers_per_block",
                   "attention", "hflip")
SAMPLING_FIELDS = ("sampler", "steps", "guidance")
SEG_FIELDS = ("lr", "loss", "class_weights", "crop", "weight_decay", "optimizer", "schedule", "warmup_epochs",
              "scale_min", "scale_max", "hflip", "jitter", "gamma", "blur", "mix", "mix_p", "batch_size", "arch",
              "backbone", "width", "norm", "upsample", "seed")    # seed: repeats of one recipe measure the seed-to-seed spread
SEARCHES = ("grid", "random", "tpe")


@dataclass
class TuneOptions:
    data: str
    name: str
    stages: tuple[str, ...]
    spaces: dict[str, SearchSpace]
    base: Any                              # the training config of training stages (DiffusionConfig / SegConfig)
    search: str = "grid"
    samples: int = 1                       # grid: repeats of the grid; random / tpe: trials
    max_concurrent: int | None = None
    workers: int = 1                       # Ray Train workers per training trial
    cpus_per_worker: float = 1.0
    cpus_per_trial: float = 1.0            # sampling trials (torch threads = this, at least 1)
    gpu: bool = False
    grace_epochs: int = 1                  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2
    num: int = 64                          # sampling: label maps (and real images) per trial
    split: str = "val"
    seed: int = 0
    batch_size: int = 16
    model: str | None = None               # sampling stage alone: the model to tune
    segmenter: str = "models:/genseg-segmenter@champion"
    class_weights: str | None = None       # seg: the base --class-weights
    objective: Objective = field(default_factory=Objective)
    promote: bool = False
    champion_margin: float = 0.0           # the winner must beat the champion by more than this


class TuneError(InputError):
    """A search that cannot run as asked (no finished trial to promote, a stage without its input)."""


TRIAL_DRIVER_CPU = 0.01    # a training trial's function only drives its Train run: a sliver of a CPU


def check_training_fits(opts: TuneOptions, cluster_cpus: float | None) -> None:
    """Training trials at once hold ``workers x cpus_per_worker`` CPUs each (and a sliver for their
    driver); what is left must take one Ray Data read task, or every trial waits for its data forever
    (on 4 logical CPUs, three one-worker trials leave 0.97).  ``cluster_cpus`` None: not judged."""
    if all(stage == "sampling" for stage in opts.stages):
        return
    concurrent = opts.max_concurrent or 1
    per_trial = opts.workers * opts.cpus_per_worker + TRIAL_DRIVER_CPU
    fit = int(((cluster_cpus or 0) - DATA_TASK_CPU + 1e-9) // per_trial)
    check_room_for_data(concurrent * per_trial, cluster_cpus,
                        (f"--max-concurrent {concurrent}: " if opts.max_concurrent else "")
                        + f"{concurrent} training trial(s) at once of {opts.workers} worker(s) x "
                          f"{opts.cpus_per_worker:g} CPU",
                        (f"at most {fit} fit at once" if fit else "not even one fits")
                        + " (lower --max-concurrent, --workers or --cpus-per-worker, or give Ray more CPUs: "
                          "GENSEG_NUM_CPUS)")


# ------------------------------------------------------------------ spaces

def spaces_for(task: str, file_spec: dict | None) -> dict[str, SearchSpace]:
    """Default space per stage, replaced stage by stage by the user's file."""
    stages = ("schedule", "sampling") if task == "diffusion" else ("seg",)
    file_spec = file_spec or {}
    wrong = [s for s in file_spec if s not in stages]
    if wrong:
        raise SpaceError(f"search space stage(s) {', '.join(wrong)} do not apply to `tune {task}` "
                         f"(its stages: {', '.join(stages)})")
    return {s: SearchSpace.parse(file_spec.get(s, DEFAULT_SPACES[s]), s) for s in stages}


def check_training_space(space: SearchSpace, base: Any, stage: str) -> None:
    allowed = SCHEDULE_FIELDS if stage == "schedule" else SEG_FIELDS

    def build(over: dict):
        over = dict(over)
        cw = over.pop("class_weights", None)
        if cw is not None:
            from jobs.train_seg import WEIGHTINGS, parse_class_weights

            try:
                name, _ = parse_class_weights(cw)
            except config_lib.ConfigError:
                raise config_lib.ConfigError(f"class_weights must be one of {', '.join(WEIGHTINGS)} (optionally "
                                             f"NAME:CAP, e.g. median-freq:5) or a list of weights; got {cw!r}") from None
            if name not in WEIGHTINGS:    # a list of weights (or "1,2,3"): one per class, as the config checks
                over["class_weights"] = cw
        return config_lib.replace(base, over)

    space.check(allowed, build, stage)


def check_sampling_space(space: SearchSpace, defaults, max_steps: int | None) -> None:
    from genseg.generation import SamplingSettings

    def build(over: dict):
        s = SamplingSettings(**{**defaults.to_dict(), **over})
        return s.validated(max_steps)

    space.check(SAMPLING_FIELDS, build, "sampling")


def ray_space(space: SearchSpace, search: str) -> dict:
    """Ray Tune domains: a list is a grid axis (``grid``) or a choice; a range is sampled."""
    from ray import tune

    from genseg.tuning import Range

    if search == "grid":
        space.check_grid()
    out = {}
    for name, v in space.fields.items():
        if isinstance(v, Range):
            if v.integer:
                out[name] = (tune.lograndint if v.log else tune.randint)(int(v.low), int(v.high) + 1)
            else:
                out[name] = (tune.loguniform if v.log else tune.uniform)(v.low, v.high)
        elif search == "grid":
            out[name] = tune.grid_search(list(v))
        else:
            out[name] = tune.choice(list(v))
    return out


# ------------------------------------------------------------------ trials (run in Ray actors)

def _schedule_trial(config: dict, ctx: dict) -> None:
    """One training trial: the runner's Train run, reporting every epoch to Tune."""
    import ray.data
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.runtime import Runtime

    trial_id = ray.tune.get_context().get_trial_id()
    if not ctx["rt"]["verbose"]:      # this process builds the Train run's datasets: no Ray Data bars
        ray.data.DataContext.get_current().enable_progress_bars = False
    rt = Runtime(**{**ctx["rt"], "workdir": Path(ctx["rt"]["workdir"])})
    base = config_lib.from_dict(ctx["cfg_cls"], ctx["base"])
    config = dict(config)
    class_weights = config.pop("class_weights", ctx.get("class_weights"))
    cfg = config_lib.replace(base, config)
    tags = {PARENT_TAG: ctx["parent_run_id"], TUNE_TAG: ctx["name"], "genseg.tune.trial": trial_id}
    common = dict(workers=ctx["workers"], gpu=ctx["gpu"], run_name=f"{ctx['name']}-{trial_id}",
                  cpus_per_worker=ctx["cpus_per_worker"], register=False, log=lambda *_: None,
                  callbacks=[TuneReportCallback()], tags=tags)
    if ctx["task"] == "seg":
        from jobs import train_seg

        train_seg.run(ctx["data"], cfg, rt, class_weights=class_weights, **common)
    else:
        from jobs import train_diffusion

        train_diffusion.run(ctx["data"], cfg, rt, **common)


def _sampling_trial(config: dict, ctx: dict) -> None:
    """One sampling trial: draw the shared label maps with these settings and score them."""
    import ray.tune
    import torch

    trial_id = ray.tune.get_context().get_trial_id()
    torch.set_num_threads(max(1, int(ctx["threads"])))
    metrics = score_settings(ctx, config)
    _log_child(ctx, f"{ctx['name']}-{trial_id}", config, metrics, trial_id)
    ray.tune.report(metrics)


def score_settings(ctx: dict, settings: dict) -> dict:
    """``eval gen``'s figures for one sampling setting on the shared real set."""
    from genseg.loading import load
    from jobs import eval_gen

    gen = load(ctx["model_dir"], expect="generator", device=ctx["device"])
    seg = load(ctx["segmenter_dir"], expect="segmenter", device=ctx["device"])
    real = ctx["real"]
    s = gen.settings(**settings)
    masks = real["masks"]
    t0 = time.perf_counter()
    fake = gen.generate(masks if gen.conditional else None, len(masks), ctx["seed"], batch_size=ctx["batch_size"],
                        **s.to_dict())
    sec = (time.perf_counter() - t0) / len(masks)
    f_fake, miou = eval_gen.features_and_miou(seg, fake, masks)
    m = {**eval_gen.compare(real["features"], f_fake, real["miou"], miou if gen.conditional else None, ctx["seed"]),
         "seconds_per_image": sec, "n": len(masks)}
    obj = Objective(**ctx["objective"])
    m["objective"] = obj.value(m)
    m["feasible"] = float(obj.feasible(m))
    return m


def _log_child(ctx: dict, run_name: str, params: dict, metrics: dict, trial_id: str) -> None:
    from mlflow.tracking import MlflowClient

    from genseg import tracking

    tracking.setup(ctx["rt"]["workdir"], ctx["rt"]["tracking_uri"])
    exp = tracking.experiment_id(ctx["experiment"], ctx["rt"]["workdir"])
    run_id, _ = tracking.start_or_resume_run(exp, run_name, params, tags={
        PARENT_TAG: ctx["parent_run_id"], TUNE_TAG: ctx["name"], "genseg.tune.trial": trial_id,
        tracking.JOB_TAG: "tune sampling trial"})
    client = MlflowClient()
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
            client.log_metric(run_id, k, float(v))
    client.set_terminated(run_id, "FINISHED")


# ------------------------------------------------------------------ driver

def _progress_callback(stage: str, metric: str, total: int | None, max_t: int | None, mark=None):
    """A Ray Tune callback printing a line per finished trial while the search runs; ``mark(trial id,
    status)`` records the status in the trial's MLflow run as soon as it ends (an interrupted search
    keeps the statuses of the trials that ended before it)."""
    from ray import tune

    class Progress(tune.Callback):
        done = 0

        def _line(self, trial, status: str) -> None:
            self.done += 1
            v = (trial.last_result or {}).get(metric)
            params = ", ".join(f"{k}={_short(val)}" for k, val in trial.config.items())
            shown = "n/a" if not isinstance(v, (int, float)) else f"{v:.4g}"
            print(f"[{stage}] trial {self.done}{f'/{total}' if total else ''} {trial.trial_id}: {params} -> {metric} "
                  f"{shown} ({status})", flush=True)

        def _mark(self, trial, status: str) -> None:
            if mark is not None:
                try:
                    mark(trial.trial_id, status)
                except Exception as exc:   # the status is written again when the stage ends
                    print(f"[{stage}] could not record {trial.trial_id}'s status in MLflow yet: {exc}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            it = (trial.last_result or {}).get("training_iteration")
            stopped = max_t is not None and it is not None and it < max_t
            self._line(trial, f"early-stopped after {it} epoch(s)" if stopped else "finished")
            self._mark(trial, "early-stopped" if stopped else "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, f"error: {_last_error_line(trial)}")
            self._mark(trial, "error")

    return Progress()


def _last_error_line(trial) -> str:
    """The exception line of a failed trial's traceback (Tune keeps it in the trial's error file)."""
    try:
        text = Path(trial.error_file).read_text() if getattr(trial, "error_file", None) else ""
    except OSError:
        text = ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(" ")]
    return lines[-1][:300] if lines else "see Ray's logs"


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _tuner(trainable, space: SearchSpace, opts: TuneOptions, rt, stage: str, metric: str, mode: str,
           scheduler=None, total: int | None = None, max_t: int | None = None, experiment: str | None = None,
           inputs: dict | None = None, resume: bool | None = None):
    """A new Tuner for ``stage`` (its settings and ``inputs`` recorded), or the interrupted one
    restored (finished trials are kept).  ``resume``: whether there is one to restore, if the
    caller has asked already."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    storage = rt.workdir / "tune" / opts.name
    exp_dir = storage / stage
    mark = None
    if experiment is not None:
        lookup = _trial_runs(rt, experiment, opts.name)

        def mark(trial_id: str, status: str) -> None:
            run_id = lookup(trial_id)
            if run_id:
                _finish_children([TrialRow(trial_id, {}, {}, status, mlflow_run_id=run_id)], rt.tracking_uri)

    progress = _progress_callback(stage, metric, total, max_t, mark)
    if resume is None:
        resume = _resumable(rt, opts.name, stage)
    if resume:
        print(f"[{stage}] resuming the search in {exp_dir}: finished trials are kept")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
        run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
        if run_config is not None:      # a restored RunConfig forgets verbose=0 (and our callback's state)
            run_config.verbose = 0
            run_config.callbacks = [progress]
        return tuner
    _record_stage(opts, rt, stage, inputs or {})
    param_space = ray_space(space, opts.search)
    concurrent = _concurrency(opts, stage)
    if opts.search == "tpe":
        from ray.tune.search.optuna import OptunaSearch

        try:
            import optuna  # noqa: F401
        except ImportError:
            raise TuneError("--search tpe needs the optuna package (pip install 'optuna>=5,<6')") from None
        algo = ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=opts.seed), max_concurrent=concurrent)
    else:
        algo = BasicVariantGenerator(max_concurrent=concurrent, random_state=opts.seed)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=opts.samples, search_alg=algo,
                                    scheduler=scheduler, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=stage, storage_path=str(storage), verbose=0, callbacks=[progress],
                                  failure_config=tune.FailureConfig(max_failures=0)))


def _resumable(rt, name: str, stage: str) -> bool:
    """Whether Ray Tune holds an interrupted experiment of ``stage`` that a rerun restores."""
    from ray import tune

    return tune.Tuner.can_restore(str(rt.workdir / "tune" / name / stage))


def _rows(grid, metric_keys: list[str], max_t: int | None, run_lookup) -> list[TrialRow]:
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        tid = m.get("trial_id") or (r.path and Path(r.path).name)
        it = m.get("training_iteration")
        if r.error is not None:
            status = "error"
        elif max_t is not None and it is not None and it < max_t:
            status = "early-stopped"
        else:
            status = "finished"
        params = {k: v for k, v in (r.config or {}).items()}
        rows.append(TrialRow(str(tid), params, {k: m.get(k) for k in metric_keys if k in m}, status,
                             epochs=it if max_t is not None else None, mlflow_run_id=run_lookup(str(tid))))
    return rows


def _trial_runs(rt, experiment: str, name: str):
    """trial id -> the MLflow run id of that trial (runs are named ``<search>-<trial id>``), or None."""
    from genseg import tracking

    exp_id = tracking.experiment_id(experiment, rt.workdir)

    def lookup(trial_id: str) -> str | None:
        run = tracking.find_run(exp_id, f"{name}-{trial_id}")
        return run.info.run_id if run else None

    return lookup


def _finish_children(rows: list[TrialRow], tracking_uri: str) -> None:
    """Each trial's MLflow run says how it ended (early-stopped and failed trials were cut off)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for r in rows:
        if not r.mlflow_run_id:
            continue
        client.set_tag(r.mlflow_run_id, STATUS_TAG, r.status)
        client.set_terminated(r.mlflow_run_id, {"finished": "FINISHED", "early-stopped": "KILLED"}.get(r.status, "FAILED"))


def _state_file(rt, name: str) -> Path:
    return rt.workdir / "tune" / name / "genseg_state.json"


# What a stage's trials are made of.  A rerun of a search resumes Ray Tune's saved experiment, whose
# space, concurrency and base recipe were fixed when it started: a rerun that asks for others would get
# the old ones without a word, so it is refused.  (--promote, --champion-margin, --json and the runtime
# flags act outside the trials and may change.)  The model and segmenter a sampling stage scores with
# are pinned by their weights, not by how they were named (:func:`_check_inputs`): the same weights
# named by path and by ``models:/...@champion`` are the same search.
_COMMON_FIELDS = ("data", "search", "samples", "max_concurrent", "seed", "gpu")
_STAGE_FIELDS = {
    "training": ("base", "workers", "cpus_per_worker", "grace_epochs", "reduction_factor", "class_weights"),
    "sampling": ("cpus_per_trial", "num", "split", "batch_size", "objective"),
}


def _concurrency(opts: TuneOptions, stage: str) -> int:
    """Trials of ``stage`` at once: ``--max-concurrent``, else 1 training trial or 2 sampling trials."""
    return opts.max_concurrent or (1 if stage != "sampling" else 2)


def _definition_file(rt, name: str) -> Path:
    return rt.workdir / "tune" / name / "genseg_definition.json"


def stage_definition(opts: TuneOptions, stage: str) -> dict:
    """The settings that shape ``stage``'s trials, as plain JSON values, one key per field
    (``space.lr``, ``base.epochs``, ``max_concurrent`` ...)."""
    from dataclasses import asdict, is_dataclass

    out = {f"space.{k}": v for k, v in opts.spaces[stage].to_dict().items()}
    for f in _COMMON_FIELDS + _STAGE_FIELDS["sampling" if stage == "sampling" else "training"]:
        v = getattr(opts, f)
        if f == "data":
            v = str(Path(v).resolve())
        elif f == "max_concurrent":
            v = _concurrency(opts, stage)
        if is_dataclass(v) and not isinstance(v, type):
            out.update({f"{f}.{k}": sub for k, sub in asdict(v).items()})
        else:
            out[f] = v
    return json.loads(json.dumps(out, default=str))     # tuples as lists, as they come back from the file


def _load_definitions(rt, name: str) -> dict:
    return _read_json(_definition_file(rt, name), f"rerun search '{name}' without checking its settings")


def _started(rt, name: str, stage: str) -> bool:
    """Whether ``stage`` of search ``name`` has anything to resume: Tune's experiment or its result."""
    return (rt.workdir / "tune" / name / stage).exists() or stage in _load_state(rt, name)


def _differences(was: dict, now: dict) -> list[str]:
    """What differs between a record and now.  A space parameter added or dropped differs; any other
    field only where both sides have it, so a record written when genseg judged other fields (a
    field since dropped, or one it did not judge yet) is judged on the fields both know."""
    keys = {k for k in set(was) | set(now) if k.startswith("space.") or (k in was and k in now)}
    return [f"{key} {_shown(was.get(key))} then, {_shown(now.get(key))} now"
            for key in sorted(keys) if was.get(key) != now.get(key)]


def _refuse(name: str, rt, diffs: list[str]) -> None:
    if diffs:
        raise TuneError(f"search '{name}' was started with other settings ({'; '.join(diffs)}), and rerunning it "
                        f"resumes the search as it was started: rerun it with the same settings to continue it, or "
                        f"give a new --name (or remove {rt.workdir / 'tune' / name} to start it again)")


def check_same_search(opts: TuneOptions, rt) -> None:
    """Refuse a rerun of search ``opts.name`` whose started stages would be resumed with other
    settings than they were started with, naming each one that differs.  A stage that never
    started (or was recorded and interrupted before Tune wrote anything) is not judged."""
    recorded = _load_definitions(rt, opts.name)
    diffs = []
    for stage in opts.stages:
        was = recorded.get(stage)
        if was is not None and _started(rt, opts.name, stage):
            diffs += _differences(was.get("settings", {}), stage_definition(opts, stage))
    _refuse(opts.name, rt, diffs)


def _shown(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _record_stage(opts: TuneOptions, rt, stage: str, inputs: dict) -> None:
    """Record ``stage``'s settings, and the inputs it resolved (the model a sampling stage tunes),
    as it starts afresh."""
    recorded = _load_definitions(rt, opts.name)
    recorded[stage] = {"settings": stage_definition(opts, stage), "inputs": inputs}
    _write_json(_definition_file(rt, opts.name), recorded)


def _check_inputs(opts: TuneOptions, rt, stage: str, inputs: dict) -> None:
    """On resuming ``stage``: the inputs it resolved now (a champion alias may have moved, or the
    stage before it not have run) must be those it started on."""
    was = _load_definitions(rt, opts.name).get(stage)
    if was is not None:
        _refuse(opts.name, rt, _differences(was.get("inputs", {}), inputs))


def _load_state(rt, name: str) -> dict:
    return _read_json(_state_file(rt, name), f"run search '{name}' again from its Tune state")


def _save_state(rt, name: str, state: dict) -> None:
    _write_json(_state_file(rt, name), state)


def _read_json(f: Path, fix: str) -> dict:
    """A search's own JSON record, {} if there is none; unreadable: one line saying how to go on."""
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        raise TuneError(f"{f} is unreadable; remove it to {fix}") from None


def _write_json(f: Path, doc: dict) -> None:
    """Write ``doc`` to ``f`` whole or not at all (a temporary file renamed over it)."""
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(f)


def _ctx_rt(rt) -> dict:
    return {"workdir": str(rt.workdir), "tracking_uri": rt.tracking_uri, "ray_address": rt.ray_address,
            "verbose": rt.verbose}


def run_training_stage(task: str, stage: str, opts: TuneOptions, rt, parent_run_id: str, experiment: str) -> dict:
    """A search over training recipes: one Ray Train run per trial, ASHA on the task's score."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from genseg import tracking

    if task == "seg":
        from jobs.train_seg import task_for

        TASK = task_for(opts.base)     # noqa: N806 (the split the base config selects on: val or e.g. holdout)
    else:
        from jobs.train_diffusion import TASK
    metric, mode = TASK.score, "max" if TASK.higher_is_better else "min"
    epochs = opts.base.epochs
    space = opts.spaces[stage]
    ctx = {"task": task, "data": str(Path(opts.data).resolve()), "base": config_lib.asdict(opts.base),
           "cfg_cls": type(opts.base), "rt": _ctx_rt(rt), "name": opts.name, "parent_run_id": parent_run_id,
           "workers": opts.workers, "gpu": opts.gpu, "cpus_per_worker": opts.cpus_per_worker,
           "class_weights": opts.class_weights}
    # the trial function only drives its Train run (whose workers hold the CPUs): a sliver of a CPU
    trainable = tune.with_resources(tune.with_parameters(_schedule_trial, ctx=ctx), {"CPU": TRIAL_DRIVER_CPU})
    # max_t one past the last epoch: ASHA stops a trial that reaches max_t at once, before the runner
    # has copied its best checkpoint out; a trial that trains all its epochs ends on its own
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1,
                              grace_period=max(1, opts.grace_epochs), reduction_factor=opts.reduction_factor)
    total = space.size * opts.samples if (opts.search == "grid" and space.size) else opts.samples
    print(f"[{stage}] {total} trial(s) of {epochs} epoch(s), {opts.search} search over: {space.describe()}; "
          f"ASHA on {metric} ({mode}), grace {max(1, opts.grace_epochs)} epoch(s), reduction factor "
          f"{opts.reduction_factor}")
    tuner = _tuner(trainable, space, opts, rt, stage, metric, mode, scheduler, total, epochs, experiment)
    t0 = time.perf_counter()
    grid = tuner.fit()
    lookup = _trial_runs(rt, experiment, opts.name)
    best_key = f"best_{metric}" if task == "diffusion" else "best_miou"
    keys = [metric, best_key, "train_loss", "epoch_seconds"]
    rows = _rows(grid, keys, epochs, lookup)
    _finish_children(rows, rt.tracking_uri)
    for r in rows:
        best_dir = rt.workdir / "runs" / f"{opts.name}-{r.trial_id}" / "best"
        r.checkpoint = str(best_dir) if best_dir.is_dir() else None
        if r.metrics.get(best_key) is None and r.metrics.get(metric) is not None:
            r.metrics[best_key] = r.metrics[metric]
    ranked = rank(rows, best_key, TASK.higher_is_better)
    finished = [r for r in ranked if r.status == "finished" and r.checkpoint]
    param_names = list(space.fields)
    table = format_table(ranked, param_names, [best_key, metric])
    print(f"[{stage}] trials, best first (by {best_key}):\n{table}")
    return {"stage": stage, "metric": best_key, "mode": mode, "space": space.to_dict(), "search": opts.search,
            "seconds": round(time.perf_counter() - t0, 1),
            "trials": [vars(r) for r in ranked], "best": vars(finished[0]) if finished else None, "table": table}


def run_sampling_stage(opts: TuneOptions, rt, parent_run_id: str, model_dir: Path, seg_dir: Path) -> dict:
    """A search over sampler, steps and guidance on one checkpoint (no training)."""
    from ray import tune

    from genseg.checkpoint import weights_digest
    from genseg.loading import load
    from jobs import eval_gen

    inputs = {"model weights": weights_digest(model_dir)[:16], "segmenter weights": weights_digest(seg_dir)[:16]}
    resume = _resumable(rt, opts.name, "sampling")
    if resume:                  # checked before the model, the data and the noise floor are loaded
        _check_inputs(opts, rt, "sampling", inputs)
    gen = load(model_dir, expect="generator")
    if gen.kind != "diffusion":
        raise TuneError(f"{model_dir} is a {gen.kind} model; the sampling search tunes diffusion models "
                        f"(sampler, steps, guidance)")
    space = opts.spaces["sampling"]
    check_sampling_space(space, gen.sampling, gen.config.timesteps)
    seg = load(seg_dir, expect="segmenter")
    both, both_masks = eval_gen.real_set(opts.data, opts.split, 2 * opts.num, tuple(gen.image_size))
    real, masks = both[: opts.num], both_masks[: opts.num]
    f_real, miou_real = eval_gen.features_and_miou(seg, real, masks)
    floor = eval_gen.noise_floor(seg, both[len(real):], f_real, opts.seed)
    ctx = {"model_dir": str(model_dir), "segmenter_dir": str(seg_dir), "device": "cuda" if opts.gpu else "cpu",
           "real": {"masks": masks, "features": f_real, "miou": miou_real}, "seed": opts.seed,
           "batch_size": opts.batch_size, "threads": opts.cpus_per_trial, "rt": _ctx_rt(rt), "name": opts.name,
           "parent_run_id": parent_run_id, "experiment": "genseg-diffusion",
           "objective": {"min_fraction": opts.objective.min_fraction, "penalty": opts.objective.penalty}}
    resources = {"CPU": opts.cpus_per_trial, **({"GPU": 1} if opts.gpu else {})}
    trainable = tune.with_resources(tune.with_parameters(_sampling_trial, ctx=ctx), resources)
    total = space.size * opts.samples if (opts.search == "grid" and space.size) else opts.samples
    print(f"[sampling] {total} trial(s), {opts.search} search over: {space.describe()}; n={len(real)} val label maps "
          f"of {opts.data} at {gen.image_size[0]}x{gen.image_size[1]}, seed {opts.seed}")
    print(f"[sampling] objective: {opts.objective.describe()}")
    t0 = time.perf_counter()
    grid = _tuner(trainable, space, opts, rt, "sampling", "objective", "min", None, total,
                  experiment="genseg-diffusion", inputs=inputs, resume=resume).fit()
    seconds = round(time.perf_counter() - t0, 1)
    lookup = _trial_runs(rt, "genseg-diffusion", opts.name)
    keys = ["objective", "fd", "fd_std", "kid", "seg_miou_samples", "seg_miou_fraction_of_ceiling", "feasible",
            "seconds_per_image"]
    rows = _rows(grid, keys, None, lookup)
    _finish_children(rows, rt.tracking_uri)
    ranked = rank(rows, "objective", False)
    ok = [r for r in ranked if r.status == "finished" and r.metrics.get("objective") is not None]
    # the model's own (untuned) settings, scored the same way, so the gain is measured, not assumed
    default = gen.sampling.to_dict()
    same = [r for r in rows if all(_same(r.params.get(k), v) for k, v in default.items())]
    baseline = same[0].metrics if same else score_settings(ctx, default)
    table = format_table(ranked, list(space.fields), ["objective", "fd", "fd_std", "seg_miou_fraction_of_ceiling",
                                                      "seconds_per_image"])
    print(f"[sampling] trials, best first (objective; FD noise floor "
          f"{'n/a' if floor is None else format(floor['fd'], '.4g')}):\n{table}")
    return {"stage": "sampling", "metric": "objective", "mode": "min", "objective": opts.objective.describe(),
            "space": space.to_dict(), "search": opts.search, "seconds": seconds, "n": len(real),
            "noise_floor": floor, "ceiling_miou": miou_real, "model": str(model_dir),
            "default": {"settings": default, "metrics": baseline},
            "trials": [vars(r) for r in ranked], "best": vars(ok[0]) if ok else None, "table": table}


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b))
    return a == b


def guidance_picture(rows: list[dict], out: Path) -> Path | None:
    """FD and segmenter-mIoU fraction against w, one line per (sampler, steps)."""
    pts = [r for r in rows if r["status"] == "finished" and "guidance" in r["params"]]
    if len({float(r["params"]["guidance"]) for r in pts}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    groups: dict[str, list] = {}
    for r in pts:
        key = f"{r['params'].get('sampler', '')} x{r['params'].get('steps', '')}"
        groups.setdefault(key, []).append(r)
    for key, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: float(r["params"]["guidance"]))
        w = [float(r["params"]["guidance"]) for r in rs]
        a.errorbar(w, [r["metrics"].get("fd") for r in rs], yerr=[r["metrics"].get("fd_std") or 0 for r in rs],
                   marker="o", capsize=3, label=key)
        frac = [r["metrics"].get("seg_miou_fraction_of_ceiling") for r in rs]
        if all(f is not None for f in frac):
            b.plot(w, [100 * f for f in frac], marker="o", label=key)
    a.set_xlabel("guidance w")
    a.set_ylabel("FD (segmenter features)")
    a.legend(fontsize=8)
    b.set_xlabel("guidance w")
    b.set_ylabel("seg mIoU, % of real-image ceiling")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def promote(task: str, model_dir: Path, opts: TuneOptions, rt, run_id: str, sampling: dict | None) -> dict:
    """Register the winner (a copy whose checkpoint carries the tuned sampling settings) under
    ``run_id`` and let the champion rule decide the alias."""
    from genseg import checkpoint as ckpt_lib
    from jobs import runner

    ck = ckpt_lib.load(model_dir)
    if task == "seg":
        from jobs.train_seg import task_for

        TASK = task_for(ck.config)     # noqa: N806
    else:
        from jobs.train_diffusion import LATENT_TASK, TASK
    if getattr(ck.config, "latent_channels", 0):
        TASK = LATENT_TASK             # noqa: N806 (a latent model keeps to its own registry)
    metrics = dict(ck.meta.get("metrics") or {})
    with tempfile.TemporaryDirectory() as tmp:
        src = model_dir
        if sampling:
            src = ckpt_lib.copy_with_meta(model_dir, Path(tmp) / "ckpt", sampling=sampling, tuned_by=opts.name)
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=rt.tracking_uri).log_artifacts(run_id, str(src), "best_checkpoint")
        return runner.register_best(TASK, run_id, src, metrics, Path(opts.data).resolve(), rt.tracking_uri,
                                    promote=opts.promote, extra_tags={TUNE_TAG: opts.name},
                                    margin=opts.champion_margin,
                                    scored_on=TASK.scored_on(ck.config) if TASK.scored_on else "val")


def run(task: str, opts: TuneOptions, rt) -> dict:
    """The whole search: its stages in order (finished ones are skipped on a rerun), then the
    winner registered.  Returns the summary that ``--json`` writes."""
    from mlflow.tracking import MlflowClient

    from genseg import tracking

    tracking.check_margin(opts.champion_margin)     # before any trial, not when the winner is registered
    check_training_fits(opts, local_cpus(rt))       # a cluster we joined may still grow (an autoscaler)
    # `genseg tune` checks this before it starts Ray (on its main thread, for Ray's signal handlers;
    # this runs in a helper thread): checked again here for any other caller
    check_same_search(opts, rt)                     # before anything of the rerun is written
    experiment = "genseg-seg" if task == "seg" else "genseg-diffusion"
    if not rt.verbose:       # Tune's trial tables and tracebacks: the progress lines say what happened
        import logging
        import os

        # Tune's newer console output prints its experiment banner whatever the verbosity; the classic
        # reporter honours verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

        for name in ("ray.tune", "ray.train", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    store = tracking.setup(rt.workdir, rt.tracking_uri)
    exp_id = tracking.experiment_id(experiment, rt.workdir)
    params = {"stages": ",".join(opts.stages), "search": opts.search, "samples": opts.samples,
              "data": str(Path(opts.data).resolve()),
              **{f"space.{s}": json.dumps(opts.spaces[s].to_dict()) for s in opts.stages}}
    if "sampling" in opts.stages:
        params["objective"] = opts.objective.describe()
    parent, resumed = tracking.start_or_resume_run(exp_id, opts.name, params, tags={tracking.JOB_TAG: f"tune {task}"})
    client = MlflowClient()
    print(f"{'resuming' if resumed else 'starting'} search '{opts.name}' (MLflow run {parent}, experiment "
          f"{experiment}); stages: {', '.join(opts.stages)}")
    state = _load_state(rt, opts.name)
    out: dict = {"name": opts.name, "task": task, "mlflow_run_id": parent, "stages": {}}
    model_dir, model_run = None, parent
    try:
        for stage in opts.stages:
            earlier = stage in state
            if earlier:
                print(f"[{stage}] finished in an earlier run of '{opts.name}': not searched again")
                res = state[stage]
                print(res["table"])
            elif stage == "sampling":
                if model_dir is None:
                    model_dir = _model_dir(opts, rt)
                seg_dir = _segmenter_dir(opts, rt)
                res = run_sampling_stage(opts, rt, parent, model_dir, seg_dir)
                pic = guidance_picture(res["trials"], rt.workdir / "tune" / opts.name / "guidance_tradeoff.png")
                res["picture"] = str(pic) if pic else None
            else:
                res = run_training_stage(task, stage, opts, rt, parent, experiment)
            best = res.get("best")
            if best is None:
                raise TuneError(f"[{stage}] no trial finished, so there is nothing to carry on with or promote")
            # logged, then recorded as finished: a rerun adds nothing to either, unless its MLflow run is
            # a new one (the search's own was not found, e.g. under another --tracking-uri)
            if not earlier or not resumed:
                for k, v in (best["metrics"] or {}).items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        client.log_metric(parent, f"{stage}.best.{k}", float(v))
                client.log_text(parent, res["table"], f"{stage}_trials.txt")
                if res.get("picture") and Path(res["picture"]).is_file():
                    client.log_artifact(parent, res["picture"])
            if not earlier:
                state[stage] = res
                _save_state(rt, opts.name, state)
            out["stages"][stage] = res
            if stage != "sampling":
                model_dir, model_run = Path(best["checkpoint"]), best["mlflow_run_id"] or parent
        sampling, keep_own = None, False
        if "sampling" in out["stages"]:
            from genseg.generation import SamplingSettings

            stage = out["stages"]["sampling"]
            default = stage["default"]
            sampling = SamplingSettings.from_dict({**default["settings"], **stage["best"]["params"]}).to_dict()
            # the model's own settings are a candidate too: a search that finds nothing better promotes nothing
            if default["metrics"].get("objective", math.inf) <= stage["best"]["metrics"]["objective"]:
                sampling, keep_own = SamplingSettings.from_dict(default["settings"]).to_dict(), True
                print(f"[sampling] the model's own settings {default['settings']} score at least as well as every "
                      f"trial (objective {default['metrics']['objective']:.4g}): they stay")
            stage["chosen"] = {"settings": sampling, "own_settings_kept": keep_own}
        to_register = "registered" not in state and not (keep_own and opts.stages == ("sampling",))
        if model_dir is None:                # sampling alone, searched in an earlier run
            model_dir = tuned_model(out["stages"]["sampling"], opts, must_exist=to_register)
        if keep_own and opts.stages == ("sampling",):
            out["registered"] = None
            print("nothing registered: the tuned model keeps its own sampling settings")
        elif "registered" in state:
            reg = out["registered"] = state["registered"]
            out["registered_earlier"] = True
            # in the MLflow store of the run that registered it, which a rerun may not track to
            there = "" if _registered_here(client, reg) else (
                f" in another MLflow store ({reg.get('store', 'not recorded')}), not in {tracking.display_uri(store)}")
            print(f"already registered by an earlier run of '{opts.name}'{there}: {reg['name']} version "
                  f"{reg['version']}")
        else:
            reg = {**promote(task, model_dir, opts, rt, model_run, sampling), "run_id": model_run,
                   "store": tracking.display_uri(store)}
            state["registered"] = out["registered"] = reg
            _save_state(rt, opts.name, state)
        out["best_sampling"] = sampling
        out["best_checkpoint"] = str(model_dir)
        client.set_terminated(parent, "FINISHED")
    except BaseException:
        client.set_terminated(parent, "KILLED")
        raise
    return out


def _registered_here(client, reg: dict) -> bool:
    """Whether the model version a search registered is in the store this run tracks to: there, and
    made from the same MLflow run (where the record says which; older records do not).  A registry
    that fails to answer is not taken for another store."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(reg["name"], str(reg["version"]))
    except MlflowException as e:
        return e.error_code != "RESOURCE_DOES_NOT_EXIST"
    return reg.get("run_id") in (None, mv.run_id)


def tuned_model(stage: dict, opts: TuneOptions, must_exist: bool) -> Path:
    """The checkpoint a finished sampling stage tuned: its settings are registered with those weights,
    whatever ``--model`` (e.g. a champion alias that moved since) names now.  Checked to be there
    only where it is still to be registered (``must_exist``)."""
    path = Path(stage["model"])
    if must_exist and not path.is_dir():
        raise TuneError(f"the model search '{opts.name}' tuned, {path}, is gone, so its settings cannot be "
                        f"registered with it; give a new --name to search again")
    return path


def _model_dir(opts: TuneOptions, rt) -> Path:
    """The checkpoint the sampling stage tunes when it runs alone: ``--model`` (default: the champion)."""
    from genseg import tracking

    ref = opts.model or "models:/genseg-diffusion@champion"
    resolved = tracking.resolve(ref, rt.tracking_uri, dst=rt.workdir / "tune" / opts.name / "model")
    return Path(resolved.path).resolve()


def _segmenter_dir(opts: TuneOptions, rt) -> Path:
    from genseg import tracking

    resolved = tracking.resolve(opts.segmenter, rt.tracking_uri, dst=rt.workdir / "tune" / opts.name / "segmenter")
    return Path(resolved.path).resolve()


def format_summary(out: dict) -> str:
    lines = []
    if "sampling" in out["stages"]:
        s = out["stages"]["sampling"]
        best, default = s["best"], s["default"]
        lines.append(f"objective: {s['objective']}")
        fl = s.get("noise_floor")
        gain = default["metrics"]["objective"] - best["metrics"]["objective"]
        lines.append(f"best trial: {best['params']} -> objective {best['metrics']['objective']:.4g} "
                     f"(FD {best['metrics']['fd']:.4g} +- {best['metrics'].get('fd_std') or 0:.2g}); the model's own "
                     f"settings {default['settings']} -> objective {default['metrics']['objective']:.4g} "
                     f"(FD +- {default['metrics'].get('fd_std') or 0:.2g}); gain {gain:.4g}; n={s['n']}, "
                     f"FD noise floor {'n/a' if not fl else format(fl['fd'], '.4g')}")
        lines.append(f"sampling settings chosen: {out.get('best_sampling')}")
    for stage in ("schedule", "seg"):
        if stage in out["stages"]:
            s = out["stages"][stage]
            b = s["best"]
            lines.append(f"best {stage} trial {b['trial_id']}: {b['params']} -> {s['metric']} "
                         f"{b['metrics'].get(s['metric']):.4g}")
    reg = out.get("registered")
    if reg and not out.get("registered_earlier"):     # else run() said so ("already registered ...")
        lines.append(f"registered {reg['name']} version {reg['version']}"
                     + (" as champion" if reg["champion"] else f"; the champion stays version {reg['previous_champion']}")
                     + f": {reg['reason']}")
    return "\n".join(lines)
