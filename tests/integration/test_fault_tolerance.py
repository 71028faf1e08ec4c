"""--max-failures: a worker process killed mid-run is replaced and training resumes from the
latest checkpoint (Ray Train's FailureConfig), finishing the requested epochs in the same MLflow
run without retraining the epochs the checkpoint already holds."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from genseg import checkpoint as ck
from jobs.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 4


def _our_train_workers(since: float) -> list[psutil.Process]:
    """Ray Train workers of THIS test's Ray (descendants of this process), started after ``since``:
    never another session's workers on the same machine."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()) and p.create_time() >= since:
                out.append(p)
        except psutil.Error:
            continue
    return out


def _committed_epochs(run_dir: Path) -> list[int]:
    """Epochs of the checkpoints Ray Train has committed so far.  A checkpoint directory appears in
    storage when a worker uploads it, but a restart resumes only from one the controller has
    registered (recorded in checkpoint_manager_snapshot.json, Ray 2.60's format); a kill in between
    restarts from the previous one, so "after a checkpoint" has to mean after this."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):              # not written yet, or being rewritten
        return []
    epochs = []
    for r in snap.get("checkpoint_results", []):
        d = run_dir / r["checkpoint_dir_name"]
        try:
            epochs.append(ck.load(d).epoch)
        except ck.CheckpointError:
            pass
    return sorted(epochs)


def test_killed_worker_is_restarted_from_checkpoint(ray_cluster, tmp_path):
    wd, data = tmp_path / "wd", str(tmp_path / "shards")
    assert main(["prepare", "--source", "synthetic", "--num", "20", "--size", "16x16", "--out", data,
                 "--workdir", str(wd)]) == 0
    result = {}

    def train():
        result["code"] = main(["train", "seg", "--data", data, "--workers", "2", "--epochs", str(EPOCHS),
                               "--batch-size", "4", "--set", "width=8", "--set", "image_every=100",
                               "--run-name", "ft", "--max-failures", "1", "--workdir", str(wd),
                               "--json", str(tmp_path / "s.json")])

    started = time.time()
    thread = threading.Thread(target=train)
    thread.start()
    run_dir = wd / "ray" / "ft"
    deadline = time.time() + 300
    while time.time() < deadline and not _committed_epochs(run_dir):
        time.sleep(0.2)
    victims = _our_train_workers(started)
    at_kill = _committed_epochs(run_dir)
    assert at_kill, "no checkpoint appeared"
    assert victims, "no Ray Train worker process of this run found"
    victim = victims[-1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)                    # raises if it survived: the kill landed on a live worker
    assert not victim.is_running()
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert result["code"] == 0

    # the kill came after a checkpoint and before the last epoch's: the run had work left to redo
    last_saved = max(at_kill)
    assert last_saved < EPOCHS - 1, f"killed only after the final checkpoint (epochs saved: {at_kill})"
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["final_epoch"] == EPOCHS - 1

    # one MLflow run; its epoch history never restarts: the epochs the checkpoint held are logged once,
    # and after the restart logging picks up after the checkpoint, never going back past it
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("genseg-seg").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"]
    assert runs[0].info.status == "FINISHED"
    history = sorted(client.get_metric_history(summary["mlflow_run_id"], "epoch"), key=lambda m: m.timestamp)
    steps = [m.step for m in history]
    assert set(steps) == set(range(EPOCHS)), steps
    for s in range(last_saved + 1):
        assert steps.count(s) == 1, f"epoch {s} (already checkpointed) logged {steps.count(s)} times: {steps}"
    seen_after = steps.index(last_saved + 1)
    assert all(s > last_saved for s in steps[seen_after:]), f"logging went back past the checkpoint: {steps}"
    mlflow.set_tracking_uri("")
