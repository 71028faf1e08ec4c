"""The one training runner behind every ``genseg train <task>``.

Driver side (:func:`run`): read the shard manifest, open (or reopen) the MLflow run, build a
``TorchTrainer`` over Ray Data shards, fit, then log the final/best checkpoints and register the
best as a new version of the task's model (taking ``champion`` when it beats the current one).
Worker side (:class:`WorkerSession`): resume state from the latest checkpoint, log metrics and
pictures from rank 0, and report each epoch with a checkpoint.  A task supplies only its loop.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from genseg import checkpoint as ckpt_lib
from genseg import config as config_lib
from genseg import engine
from genseg import rng as rng_lib
from genseg.data.shards import COLUMNS, LATENT, decode_batch, encode_row
from jobs.runtime import check_room_for_data, local_cpus


@dataclass(frozen=True)
class Task:
    name: str                    # "seg", "diffusion"
    experiment: str              # MLflow experiment
    model_name: str              # registered model
    score: str                   # metric that picks the best checkpoint and the champion
    higher_is_better: bool
    loop: Callable[[dict], None]
    model_fields: tuple[str, ...]   # config fields that must match to resume a run
    # what the score was computed on, for the champion rule (default: the whole val split); two
    # versions compete only when this matches, e.g. a GAN's score on the first N val images
    scored_on: Callable[[Any], str] | None = None

    @property
    def job(self) -> str:
        """The MLflow tag (``genseg.job``) of this task's training runs: "train seg", ..."""
        return f"train {self.name}"


# ------------------------------------------------------------------ worker side

class WorkerSession:
    """What every worker loop needs from Ray Train and MLflow, in a few obvious lines."""

    def __init__(self, loop_config: dict, cfg_cls: type):
        for name in ("ray.train", "ray.data"):   # per-report INFO lines drown the epoch summaries
            logging.getLogger(name).setLevel(logging.WARNING)
        self.cfg = config_lib.from_dict(cfg_cls, loop_config["cfg"])
        self.rt = loop_config["runtime"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if getattr(self.cfg, "threads_per_worker", 0):
            torch.set_num_threads(self.cfg.threads_per_worker)
        self.device = ray.train.torch.get_device()
        if self.rt.get("elastic") and self.rt.get("train_names"):   # this attempt's group size, not the largest
            self.rt["steps_per_epoch"] = steps_per_epoch(len(self.rt["train_names"]), self.world, self.cfg.batch_size)
        self._client = None
        self._train_rows: dict | None = None      # the train split, decoded, once epoch 1 has read it
        if self.rank == 0 and self.rt.get("mlflow_run_id"):
            from mlflow.tracking import MlflowClient

            from genseg.tracking import bounded_retries

            bounded_retries()
            self._client = MlflowClient(tracking_uri=self.rt["tracking_uri"])

    @staticmethod
    def say(message: str) -> None:
        """One progress line in the driver's output.  Ray Train patches ``print`` in workers to tee
        into its logger as well as the (wrapped) stdout, which shows every line twice."""
        print(message, file=sys.__stdout__, flush=True)

    def epoch_batches(self, epoch: int, batch_size: int):
        """This worker's training batches of ``epoch`` (columnar dicts), in the epoch's seeded order.

        The "train" dataset is not split by Ray Data (see ``run``): every worker streams the whole
        split and keeps its share of a permutation seeded by ``(cfg.seed, epoch)`` (engine.epoch_batches).
        When the split fits ``$GENSEG_TRAIN_CACHE_MB`` it is streamed once: the first epoch keeps
        it decoded in this worker and later epochs deal from that copy, with the same rows."""
        if self._train_rows is not None:
            stream = [self._train_rows]
        else:
            stream = ray.train.get_dataset_shard("train").iter_batches(batch_size=64, batch_format="numpy")
            if self.rt.get("cache_train"):
                stream = self._caching(stream)
        return engine.epoch_batches(stream, self.rt["train_names"], self.cfg.seed, epoch, self.rank, self.world,
                                    batch_size, self.rt["steps_per_epoch"])

    def _caching(self, stream):
        """Pass the first epoch's stream through, keeping every row decoded (as raw arrays): later
        epochs read this worker's memory instead of streaming and decoding the split again."""
        rows: dict[str, list] = {k: [] for k in COLUMNS}
        for batch in stream:
            yield batch
            if "codec" in batch and len(batch["name"]) and str(batch["codec"][0]) == LATENT:
                for k in COLUMNS:     # latent rows decode by a reshape already: kept as they are
                    rows[k].extend(batch[k])
                continue
            for name, (image, mask) in zip(batch["name"], decode_batch(batch)):
                row = encode_row(str(name), np.ascontiguousarray(image), np.ascontiguousarray(mask), "raw")
                for k in COLUMNS:
                    rows[k].append(row[k])
        self._train_rows = rows

    def restore(self, models, optimizers: dict | None = None, schedulers: dict | None = None,
                rngs: dict | None = None, scaler=None) -> tuple[int, dict]:
        """Load the latest checkpoint (if any) into the given objects -> (start epoch, meta).

        ``models`` maps the names :meth:`report` saved them under to modules: ``"model"`` is the
        checkpoint's own model (``model.safetensors``), any other name a ``<name>.safetensors``
        beside it (``"ema"``, ``"discriminator"``); a bare module means ``{"model": module}``.
        ``optimizers`` / ``schedulers`` map names to objects the same way.  ``rngs`` names the
        loop's own generators (``random.Random`` / ``torch.Generator``), whose state is put back
        with the global ones of this rank; ``scaler`` is an fp16 GradScaler.  Call it after
        everything that draws random numbers at start-up (model init), right before the epoch
        loop, and build the models on their device first so optimizer state lands beside them."""
        models = _named(models)
        resume = ray.train.get_checkpoint()
        if not resume:
            return 0, {}
        with resume.as_directory() as d:
            ck = ckpt_lib.load(d)
            state = ckpt_lib.load_train_state(d) or {"optimizers": {}, "schedulers": {}}
            for name, module in models.items():
                weights = ck.state_dict if name == "model" else ckpt_lib.load_weights(d, name)
                if weights is None:
                    raise ckpt_lib.CheckpointError(f"the checkpoint to resume from has no {name!r} weights")
                module.load_state_dict(weights)
            for kind, objs in (("optimizers", optimizers), ("schedulers", schedulers)):
                for name, obj in (objs or {}).items():
                    if obj is not None and state[kind].get(name):
                        obj.load_state_dict(state[kind][name])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            meta = dict(ck.meta)
            meta["extra_state"] = {k: v for k, v in state.items()
                                   if k not in ("optimizers", "schedulers", "epoch", "rng", "scaler")}
            start = int(state.get("epoch", ck.epoch)) + 1
        self._align_schedulers(schedulers or {}, start)
        self._restore_rngs(state.get("rng") or [], rngs or {}, start)
        return start, meta

    def _align_schedulers(self, schedulers: dict, start: int) -> None:
        """Put each per-step LR schedule at ``start`` epochs of *this* attempt's steps per epoch.

        The saved step counter is the right position only while the steps per epoch stay the same;
        an elastic run that resumed on fewer (or more) workers takes more (fewer) steps per epoch, and
        its schedule (built for this attempt's steps) must stand at the same share of the run."""
        step = start * int(self.rt.get("steps_per_epoch") or 0)
        for sched in schedulers.values():
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR) and step and sched.last_epoch != step:
                sched.last_epoch = step
                lrs = [base * lam(step) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
                for group, lr in zip(sched.optimizer.param_groups, lrs):
                    group["lr"] = lr
                sched._last_lr = lrs

    def _restore_rngs(self, per_rank: list, rngs: dict, start: int) -> None:
        """This rank's saved generator states; without one (an older checkpoint, or more workers
        than saved it) reseed from ``(seed, rank, start epoch)`` so no stream repeats epoch 0's."""
        if self.rank < len(per_rank):
            missing = rng_lib.restore(per_rank[self.rank], rngs)
        else:
            rng_lib.seed_globals(rng_lib.derive_seed(self.cfg.seed, start), self.rank)
            missing = list(rngs)
            if self.rank == 0:
                self.say(f"checkpoint holds no random state for rank {self.rank}: reseeding for epoch {start}")
        for i, name in enumerate(sorted(missing)):
            g, seed = rngs[name], rng_lib.derive_seed(self.cfg.seed, self.rank, start, i)
            g.seed(seed) if isinstance(g, random.Random) else g.manual_seed(seed)

    def mean(self, value: float) -> float:
        """Average a float over all workers."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item() / dist.get_world_size())

    def epoch_means(self, figures: dict[str, list[float]], seconds: float, batch_size: int) -> dict:
        """An epoch's per-step figures averaged over the steps and the workers, with the epoch's
        seconds and images per second over all workers (every worker must call it: it all-reduces)."""
        import numpy as np

        steps = max((len(v) for v in figures.values()), default=0)
        out = {k: self.mean(float(np.mean(v))) for k, v in figures.items() if v}
        out.update({"samples_per_s": steps * batch_size * self.world / max(seconds, 1e-9), "epoch_seconds": seconds})
        return out

    def log(self, epoch: int, metrics: dict, picture: np.ndarray | None = None, picture_name: str = "") -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, epoch) for k, v in {**metrics, "workers": self.world}.items()
              if isinstance(v, (int, float)) and np.isfinite(v)]
        self._client.log_batch(self.rt["mlflow_run_id"], metrics=ms)
        self.log_picture(picture, picture_name)

    def log_picture(self, picture: np.ndarray | None, name: str) -> None:
        """A picture among the run's artifacts (rank 0 logs; nothing when None)."""
        if self._client is not None and picture is not None:
            self._client.log_image(self.rt["mlflow_run_id"], picture, name)

    def _gather_rngs(self, rngs: dict) -> list:
        """Every rank's generator states, in rank order (rank 0 writes them all into the checkpoint)."""
        import torch.distributed as dist

        mine = rng_lib.capture(rngs)
        if self.world == 1 or not (dist.is_available() and dist.is_initialized()):
            return [mine]
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)   # NCCL: Ray Train has set this worker's CUDA device
        return everyone

    def broadcast(self, value: float) -> float:
        """Rank 0's float on every worker (for a score only rank 0 computes)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def report(self, epoch: int, metrics: dict, models, optimizers: dict | None = None,
               schedulers: dict | None = None, meta: dict | None = None, extra_state: dict | None = None,
               rngs: dict | None = None, scaler=None) -> None:
        """``ray.train.report`` on every worker (it is a barrier); rank 0 attaches the checkpoint.

        ``models``, ``optimizers`` and ``schedulers`` are named as for :meth:`restore`.  The
        checkpoint carries every rank's random state (global generators + ``rngs``) and the
        GradScaler's, so a resumed run continues the very same random streams."""
        models = _named(models)
        states = self._gather_rngs(rngs or {})
        if self.rank != 0:
            ray.train.report(metrics)
            return
        extra = {**(extra_state or {}), "rng": states}
        if scaler is not None:
            extra["scaler"] = scaler.state_dict()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ckpt"
            ckpt_lib.save(path, models["model"], self.cfg, epoch=epoch, metrics=metrics, classes=self.rt["classes"],
                          optimizers=optimizers, schedulers=schedulers, extra_meta=meta, extra_state=extra,
                          extra_weights={k: m for k, m in models.items() if k != "model"})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)))


def _mark_failed(client, run_id: str) -> None:
    """The MLflow run ends FAILED, unless it has already ended otherwise: a Tune trial stopped by its
    scheduler is marked KILLED by the search, and the stop can reach this process after that."""
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return
    except Exception:          # the tracking store is unreachable: try the write anyway
        pass
    client.set_terminated(run_id, status="FAILED")


def _named(models) -> dict:
    """``{"model": m, ...}`` from a dict or a bare module; the checkpoint's own model is required."""
    models = models if isinstance(models, dict) else {"model": models}
    if "model" not in models:
        raise ValueError("models must include the checkpoint's own model under the name 'model'")
    return models


# ------------------------------------------------------------------ driver side

def _env_number(name: str, default: str, ok, expected: str) -> float | None:
    """``$name`` (or ``default``) as a float that passes ``ok``, None when both are empty; anything else
    is one :class:`ConfigError` naming the variable and what it expects."""
    text = os.environ.get(name, default).strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise config_lib.ConfigError(f"${name}={text!r}: expected {expected}")
    return value


def _resize_interval(elastic: bool) -> dict:
    """How often an elastic run checks whether it can grow (Ray's default 60 s;
    ``$GENSEG_ELASTIC_RESIZE_S`` sets it: each growth restarts the group from the latest checkpoint)."""
    value = _env_number("GENSEG_ELASTIC_RESIZE_S", "", lambda v: v > 0, "seconds > 0") if elastic else None
    return {} if value is None else {"elastic_resize_monitor_interval_s": value}


CACHE_ENV = "GENSEG_TRAIN_CACHE_MB"


def train_cache_mb(manifest: dict) -> float | None:
    """MB each worker needs to hold the train split decoded, when that is within ``$GENSEG_TRAIN_CACHE_MB``
    (default 2048; 0 turns caching off), else None: the split is then streamed every epoch."""
    limit = _env_number(CACHE_ENV, "2048", lambda v: v >= 0, "megabytes >= 0 (0 turns the cache off)") or 0.0
    biggest = max((int(h) * int(w) for h, w in manifest.get("sizes") or []), default=0)
    need = manifest["splits"]["train"]["count"] * biggest * 4 / 2**20
    return need if 0 < need <= limit else None


def check_resumable(task: Task, run_dir: Path, cfg: Any, run_name: str) -> None:
    """A re-run continues the saved weights, so the model it builds must be the same one."""
    # checkpoint_<timestamp> directories (not Ray's checkpoint_manager_snapshot.json), oldest first
    latest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    if not latest:
        return
    try:
        saved = ckpt_lib.load(latest[-1]).config
    except ckpt_lib.CheckpointError:
        return
    if type(saved) is not type(cfg):
        raise config_lib.ConfigError(f"run '{run_name}' exists for another task ({type(saved).__name__}); "
                                     f"pick a new --run-name")
    diff = {f: (getattr(saved, f), getattr(cfg, f)) for f in task.model_fields if getattr(saved, f) != getattr(cfg, f)}
    if diff:
        desc = ", ".join(f"{f}: {a!r} -> {b!r}" for f, (a, b) in diff.items())
        raise config_lib.ConfigError(f"run '{run_name}' exists with a different model ({desc}); "
                                     f"resume it with the same settings or pick a new --run-name")


def check_splits(data_dir: Path, manifest: dict) -> None:
    for split in ("train", "val"):
        if split not in manifest["splits"]:
            raise config_lib.ConfigError(f"{data_dir} has no '{split}' split (has: {', '.join(manifest['splits'])})")


def most_workers(workers: int | tuple[int, int]) -> int:
    """The largest worker group of a fixed (``N``) or elastic (``(MIN, MAX)``) run."""
    return max(workers) if isinstance(workers, (tuple, list)) else int(workers)


def describe_workers(workers: int | tuple[int, int]) -> str:
    return f"{workers[0]}-{workers[1]}" if isinstance(workers, (tuple, list)) else str(workers)


def steps_per_epoch(n_train: int, workers: int | tuple[int, int], batch_size: int) -> int:
    """Optimizer steps per epoch for each worker (of the largest group, for an elastic run)."""
    workers = most_workers(workers)
    per_worker = n_train // workers
    if per_worker < batch_size:
        raise config_lib.ConfigError(
            f"{n_train} training images over {workers} workers is fewer than batch_size={batch_size} "
            f"per worker; lower --batch-size or --workers")
    return per_worker // batch_size


def train_names(data_dir: Path) -> list[str]:
    """The sorted row names of the train split (the epoch permutations index this list)."""
    import pyarrow.dataset as pads

    names = sorted(pads.dataset(str(data_dir / "train"), format="parquet").to_table(columns=["name"])
                   .column("name").to_pylist())
    dup = next((a for a, b in zip(names, names[1:]) if a == b), None)
    if dup is not None:
        raise config_lib.ConfigError(f"{data_dir / 'train'} holds two rows named {dup!r}; "
                                     f"prepare the shards again with `genseg prepare`")
    return names


def image_size_from_manifest(manifest: dict, base: Any, data_dir: Path) -> dict:
    """``{"image_size": the shards' size}`` where the config leaves it unset (one size is required
    then), else ``{}``."""
    if base.image_size is not None:
        return {}
    if manifest.get("size") is None:
        raise config_lib.ConfigError(f"{data_dir} holds images of several sizes; set --set image_size=HxW")
    return {"image_size": tuple(manifest["size"])}


def fill_from_manifest(manifest: dict, base: Any, data_dir: Path) -> Any:
    """A generative model's config completed from the shards: class count, ignore index and, unless
    set, the image size (one size is required then).  The config's own checks (e.g. a GAN's size
    must halve cleanly) run on the result."""
    over = {"num_classes": manifest["num_classes"], "ignore_index": manifest["ignore_index"],
            **image_size_from_manifest(manifest, base, data_dir)}
    return config_lib.replace(base, over)


def fit(task: Task, data: str, cfg: Any, rt, build_config: Callable[[dict, Any, Path], Any] = fill_from_manifest,
        *, workers: int = 2, run_name: str | None = None, runtime: dict | None = None, **kw) -> dict:
    """Shards -> completed config -> :func:`run`, for a task whose loop needs the standard runtime
    (steps per epoch and the train split's row names) plus, optionally, entries of its own (``runtime``)."""
    from genseg.data.shards import read_manifest

    data_dir = Path(data).resolve()
    manifest = read_manifest(data_dir)
    check_splits(data_dir, manifest)
    cfg = build_config(manifest, cfg, data_dir)
    steps = steps_per_epoch(manifest["splits"]["train"]["count"], workers, cfg.batch_size)
    runtime = {**(runtime or {}), "steps_per_epoch": steps, "train_names": train_names(data_dir)}
    return run(task, data_dir, manifest, cfg, rt, runtime, workers=workers,
               run_name=run_name or f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}", **kw)


def run(task: Task, data_dir: Path, manifest: dict, cfg: Any, rt, runtime: dict, *, workers: int = 2,
        gpu: bool = False, run_name: str | None = None, max_failures: int = 0, cpus_per_worker: float = 1.0,
        register: bool = True, promote: bool = False, log=print, callbacks: list | None = None,
        tags: dict | None = None, spread: bool = False, eval_splits: tuple[str, ...] = (),
        champion_margin: float = 0.0) -> dict:
    """Fit ``task`` and return a summary (run ids, best score, checkpoint paths, registry outcome).

    ``callbacks`` are Ray Train user callbacks (a Tune trial passes ``TuneReportCallback``);
    ``tags`` go on the MLflow run when it is created (a Tune trial names its parent run).
    ``workers`` is a count or ``(MIN, MAX)``: an elastic run that Ray Train shrinks when workers or
    nodes are lost and grows again when resources return, each time from the latest checkpoint
    (each worker then recomputes its steps per epoch for the new group size; the ``workers``
    metric of every epoch says how many there were).  ``spread`` places the workers on as many
    nodes as it can (``placement_strategy="SPREAD"``) instead of packing them.  ``eval_splits``: more
    splits besides val (e.g. ``holdout``) that every worker can read whole, as datasets of those names.
    ``champion_margin``: how far the best score must beat the champion's to take the alias
    (:func:`genseg.tracking.decide_champion`)."""
    from mlflow.tracking import MlflowClient

    from genseg import tracking

    check_splits(data_dir, manifest)
    run_name = run_name or f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_resumable(task, rt.workdir / "ray" / run_name, cfg, run_name)
    tracking.check_margin(champion_margin)      # refused before training, not after it
    elastic = isinstance(workers, (tuple, list))
    most = max(workers) if elastic else workers
    check_room_for_data(most * cpus_per_worker, local_cpus(rt), f"{describe_workers(workers)} worker(s) x "
                        f"{cpus_per_worker:g} CPU", "lower --workers or --cpus-per-worker, or give Ray more CPUs: "
                        "GENSEG_NUM_CPUS")
    resize = _resize_interval(elastic)          # a bad setting is refused before the MLflow run exists
    cache_mb = train_cache_mb(manifest)         # so is a bad cache setting
    tracking.setup(rt.workdir, rt.tracking_uri)
    exp_id = tracking.experiment_id(task.experiment, rt.workdir)
    params = {**config_lib.asdict(cfg), "data": str(data_dir), "workers": describe_workers(workers), "gpu": gpu}
    run_id, resumed = tracking.start_or_resume_run(exp_id, run_name, params,
                                                   tags={tracking.JOB_TAG: task.job, **(tags or {})})
    log(f"{'resuming' if resumed else 'starting'} {task.name} run '{run_name}' (MLflow run {run_id}), "
        f"{describe_workers(workers)} worker(s), {runtime.get('steps_per_epoch')} steps/epoch"
        + (f"; each worker keeps the train split decoded in memory after epoch 1 ({cache_mb:.0f} MB)" if cache_mb else ""))

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}
    trainer = TorchTrainer(
        task.loop,
        train_loop_config={"cfg": config_lib.asdict(cfg), "runtime": {
            **runtime, "classes": manifest["classes"], "mlflow_run_id": run_id, "tracking_uri": rt.tracking_uri,
            "elastic": elastic, "cache_train": bool(cache_mb)}},
        scaling_config=ScalingConfig(num_workers=tuple(workers) if elastic else workers, use_gpu=gpu,
                                     resources_per_worker=resources, placement_strategy="SPREAD" if spread else "PACK",
                                     **resize),
        run_config=RunConfig(
            name=run_name, storage_path=str(rt.workdir / "ray"), callbacks=list(callbacks or []),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=task.score,
                                               checkpoint_score_order="max" if task.higher_is_better else "min")),
        # Shuffling: every epoch visits the training set in a new order seeded by (seed, epoch), across
        # files and within them, identical in a straight and in a resumed run.  Ray Data's own tools do
        # not give that: random_shuffle/randomize_block_order with an int seed repeat one order every
        # epoch, and with RandomSeedConfig(reseed_after_execution=True) they key the order to an
        # execution counter that restarts at 0 in a resumed run; streaming_split hands blocks to
        # whichever worker asks first; local_shuffle_buffer_size only mixes a window of rows.  So
        # "train" is not split: each worker streams the whole split and keeps its share of a seeded
        # per-epoch permutation of the row names (WorkerSession.epoch_batches), holding 1/N of it in
        # memory.  The price is N reads of the split: once per run when it fits each worker's cache
        # (train_cache_mb), else per epoch; beyond a few GB, split it and permute within each shard.
        datasets={"train": ray.data.read_parquet(str(data_dir / "train")),
                  # val is small and read whole by every worker each epoch: keep it in memory
                  "val": ray.data.read_parquet(str(data_dir / "val")).materialize(),
                  **{split: ray.data.read_parquet(str(data_dir / split)).materialize() for split in eval_splits}},
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    client = MlflowClient()
    try:
        result = trainer.fit()
    except Exception:
        _mark_failed(client, run_id)
        raise
    if result.error:
        _mark_failed(client, run_id)
        raise RuntimeError(f"training run '{run_name}' failed: {result.error}")

    best_ckpt, best_metrics = pick_best(task, result.best_checkpoints)
    out = rt.workdir / "runs" / run_name
    with result.checkpoint.as_directory() as d:
        final_epoch = ckpt_lib.load(d).epoch
        client.log_artifacts(run_id, d, "checkpoint")
    with best_ckpt.as_directory() as d:
        client.log_artifacts(run_id, d, "best_checkpoint")
        shutil.rmtree(out / "best", ignore_errors=True)
        shutil.copytree(d, out / "best")
    summary = {"task": task.name, "run_name": run_name, "mlflow_run_id": run_id, "resumed": resumed,
               "final_epoch": final_epoch, "best_epoch": int(best_metrics["epoch"]),
               "score": task.score, "best_score": best_metrics[task.score],
               "final_metrics": result.metrics, "best_checkpoint": str(out / "best"),
               "tracking_uri": rt.tracking_uri}
    done_epoch = client.get_run(run_id).data.tags.get("genseg.registered_epoch")
    if register and done_epoch != str(final_epoch):
        summary["registered"] = register_best(task, run_id, out / "best", best_metrics, data_dir, rt.tracking_uri,
                                              promote=promote, margin=champion_margin,
                                              scored_on=task.scored_on(cfg) if task.scored_on else "val")
        client.set_tag(run_id, "genseg.registered_epoch", str(final_epoch))
    client.set_terminated(run_id, status="FINISHED")
    return summary


def pick_best(task: Task, checkpoints: list[tuple[Any, dict]]) -> tuple[Any, dict]:
    """The ``(checkpoint, metrics)`` pair whose ``task.score`` is best (a pair without it loses)."""
    sign = 1 if task.higher_is_better else -1
    return max(checkpoints, key=lambda cm: sign * cm[1].get(task.score, -sign * float("inf")))


def register_best(task: Task, run_id: str, best_dir: Path, best_metrics: dict, data_dir: Path,
                  tracking_uri: str, promote: bool = False, scored_on: str = "val", artifact: str = "model",
                  extra_tags: dict | None = None, margin: float = 0.0) -> dict:
    """Log the best checkpoint as an MLflow pyfunc model and register it; the champion rule decides
    the alias (same data, comparable finite score, better by more than ``margin``; ``promote`` overrides)."""
    from mlflow.tracking import MlflowClient

    from genseg import tracking
    from genseg.data.shards import fingerprint
    from genseg.loading import KINDS, sampling_of

    tracking.check_margin(margin)                   # before anything is logged
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    ck = ckpt_lib.load(best_dir)
    kind = KINDS[type(ck.config).__name__][0]
    with tempfile.TemporaryDirectory() as tmp:
        tracking.save_pyfunc(best_dir, Path(tmp) / "model", kind)
        client.log_artifacts(run_id, str(Path(tmp) / "model"), artifact)
    # the champion rule compares scores on the same data: the split the score was computed on
    digest, desc = fingerprint(data_dir, scored_on if (data_dir / scored_on).is_dir() else "val")
    client.set_tag(run_id, tracking.DATA_TAG, digest)
    value = best_metrics.get(task.score)
    score = tracking.Score(task.score, None if value is None else float(value), task.higher_is_better)
    sampling = sampling_of(ck)
    return tracking.register(run_id, artifact, task.model_name, score, data_fingerprint=digest, scored_on=scored_on,
                             data_desc=f"{data_dir} ({desc})", promote=promote,
                             sampling=None if sampling is None else sampling.to_dict(),
                             tracking_uri=tracking_uri, weights_digest=ckpt_lib.weights_digest(best_dir),
                             extra_tags=extra_tags, margin=margin)
