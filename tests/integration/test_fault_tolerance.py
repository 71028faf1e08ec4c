"""--max-failures: a worker process killed mid-run is replaced and training resumes from the
latest checkpoint (Ray Train's FailureConfig), finishing the requested epochs."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from jobs.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _train_workers() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "RayTrainWorker" in cmd:
            out.append(p)
    return out


def test_killed_worker_is_restarted_from_checkpoint(ray_cluster, tmp_path):
    wd, data = tmp_path / "wd", str(tmp_path / "shards")
    assert main(["prepare", "--source", "synthetic", "--num", "20", "--size", "32x32", "--out", data,
                 "--workdir", str(wd)]) == 0
    result = {}

    def train():
        result["code"] = main(["train", "seg", "--data", data, "--workers", "2", "--epochs", "4",
                               "--batch-size", "4", "--set", "width=8", "--run-name", "ft",
                               "--max-failures", "1", "--workdir", str(wd), "--json", str(tmp_path / "s.json")])

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.time() + 300
    ckpt_root = wd / "ray" / "ft"
    while time.time() < deadline and not list(ckpt_root.glob("checkpoint_*")):
        time.sleep(0.5)
    assert list(ckpt_root.glob("checkpoint_*")), "no checkpoint appeared"
    victims = _train_workers()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1].pid, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive()
    assert result["code"] == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["final_epoch"] == 3
