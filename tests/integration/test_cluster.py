"""genseg on a real two-node Ray cluster on this machine, driven as a user drives one: `ray start
--head` plus a second `ray start --address` (its own raylet and resources), an `mlflow server` with a
sqlite backend and an artifact store, and genseg commands sent with `genseg submit` (Ray Jobs).

Everything here is started by this module and stopped by PID (SIGTERM to each `ray start --block` /
`mlflow server`, then SIGKILL to what is left of *its own* process group), even when a test fails;
never `ray stop`, which would end every Ray of the user on the machine."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from genseg import checkpoint as ck
from serve_app.server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
TINY = ["--batch-size", "4", "--set", "width=8", "--set", "image_every=100"]


def _get(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _wait(what: str, ok, timeout: float, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process it needs exited with {p.returncode}")
        try:
            if ok():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen, grace: float = 40) -> None:
    """SIGTERM to the process we started (a `ray start --block` then stops its node); whatever of its
    own process group is still there after ``grace`` seconds gets SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)     # start_new_session: the group is this process's own
    except (ProcessLookupError, PermissionError):
        pass


def _alive_nodes(dashboard: str) -> int:
    body = json.loads(_get(f"{dashboard}/api/v0/nodes?limit=10"))
    return sum(1 for n in body["data"]["result"]["result"] if n["state"] == "ALIVE")


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="gsc", dir="/tmp"))     # short: Ray's socket paths are length-limited
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",   # the head runs jobs with this python
           "RAY_DEDUP_LOGS": "0"}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "GENSEG_WORKDIR"):
        env.pop(var, None)
    gcs, dash, client, mlflow_port = free_port(preferred=0), free_port(preferred=0), free_port(preferred=0), free_port(preferred=0)
    logs = root / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def start(name, argv):
        procs[name] = subprocess.Popen(argv, env=env, cwd=root, stdout=open(logs / f"{name}.log", "w"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return procs[name]

    try:
        start("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                         "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"])
        start("head", [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=3",
                       "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                       f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={free_port(preferred=0)}",
                       f"--temp-dir={root}/ray", "--disable-usage-stats"])
        dashboard = f"http://127.0.0.1:{dash}"
        _wait("the head", lambda: _alive_nodes(dashboard) == 1, 120, [procs["head"]])

        def add_node():
            start("node2", [str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{gcs}", "--num-cpus=3",
                            "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port(preferred=0)}",
                            "--disable-usage-stats"])
            _wait("the second node", lambda: _alive_nodes(dashboard) == 2, 120, [procs["node2"]])

        def remove_node():
            _stop(procs["node2"])
            _wait("the second node's end", lambda: _alive_nodes(dashboard) == 1, 120)

        add_node()
        tracking = f"http://127.0.0.1:{mlflow_port}"
        _wait("mlflow server", lambda: _get(f"{tracking}/health") == "OK", 120, [procs["mlflow"]])
        yield {"root": root, "dashboard": dashboard, "tracking": tracking, "procs": procs, "env": env,
               "workdir": root / "wd", "add_node": add_node, "remove_node": remove_node}
    finally:
        for name in ("node2", "head", "mlflow"):
            if name in procs:
                _stop(procs[name])
        current = Path("/tmp/ray/ray_current_cluster")     # a stale pointer at our dead head: remove it
        try:
            if current.read_text().strip().endswith(f":{gcs}"):
                current.unlink()
        except OSError:
            pass
        shutil.rmtree(root, ignore_errors=True)


def genseg(cluster, *argv, timeout=600):
    """`genseg submit` (or `genseg jobs`) as a user runs it, with the cluster's address."""
    env = {k: v for k, v in cluster["env"].items() if k != "PATH"}
    env["PATH"] = os.environ.get("PATH", "")
    # another Ray's address in the environment (Ray's client prefers it to the one it is given):
    # --address must still win
    env["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:9"
    cmd, rest = argv[0], list(argv[1:])
    if cmd == "submit":
        rest = ["--address", cluster["dashboard"], "--workdir", str(cluster["workdir"]),
                "--tracking-uri", cluster["tracking"], *rest]
    else:
        rest = [*rest, "--address", cluster["dashboard"]]
    return subprocess.run([sys.executable, "-m", "jobs.cli", cmd, *rest], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def shards(cluster):
    out = cluster["root"] / "shards"
    r = genseg(cluster, "submit", "--", "prepare", "--source", "synthetic", "--num", "24", "--size", "16x16",
               "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted job" in r.stdout and (out / "manifest.json").is_file()
    return out


def _job_id(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("submitted job "))
    return line.split()[2]


def _epochs_logged(client: MlflowClient, run_id: str, metric: str = "epoch") -> list[tuple[int, float]]:
    hist = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.timestamp, m.step))
    return [(m.step, m.value) for m in hist]


def _run(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("genseg-seg")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_submitted_training_tracks_and_registers_through_the_mlflow_server(cluster, shards, tmp_path):
    from genseg import tracking
    from genseg.loading import load

    r = genseg(cluster, "submit", "--", "train", "seg", "--data", str(shards), "--workers", "2", "--spread",
               "--epochs", "2", "--run-name", "c1", *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "epoch 2/2" in r.stdout and "registered genseg-segmenter version 1 as champion" in r.stdout
    job = _job_id(r.stdout)

    client = MlflowClient(tracking_uri=cluster["tracking"], registry_uri=cluster["tracking"])
    run = _run(client, "c1")
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")     # artifacts go through the server
    assert [s for s, _ in _epochs_logged(client, run.info.run_id)] == [0, 1]
    assert {v for _, v in _epochs_logged(client, run.info.run_id, "workers")} == {2}
    mv = client.get_model_version_by_alias("genseg-segmenter", "champion")
    assert mv.version == "1" and mv.run_id == run.info.run_id
    # a user elsewhere gets the champion through the server and uses it
    model = load(tracking.resolve("models:/genseg-segmenter@champion", cluster["tracking"], dst=str(tmp_path)))
    import numpy as np

    assert model.segment(np.zeros((16, 16, 3), np.uint8)).shape == (16, 16)
    assert any((cluster["root"] / "artifacts").rglob("model.safetensors"))

    listed = genseg(cluster, "jobs", "list")
    assert listed.returncode == 0 and any(ln.startswith(job) and "SUCCEEDED" in ln for ln in listed.stdout.splitlines())
    logs = genseg(cluster, "jobs", "logs", job)
    assert logs.returncode == 0 and "epoch 2/2" in logs.stdout
    bad = genseg(cluster, "jobs", "logs", "raysubmit_nosuchjob")
    assert bad.returncode == 1 and "no job 'raysubmit_nosuchjob'" in bad.stderr


def _committed_epochs(run_dir: Path) -> list[int]:
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for r in snap.get("checkpoint_results", []):
        try:
            out.append(ck.load(run_dir / r["checkpoint_dir_name"]).epoch)
        except ck.CheckpointError:
            pass
    return sorted(out)


def _train_workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The Ray Train workers running under one of *our* `ray start` processes (one node)."""
    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _wait_for_checkpoint(run_dir: Path, job: str, cluster, timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _committed_epochs(run_dir)
        if got:
            return got
        time.sleep(0.2)
    logs = genseg(cluster, "jobs", "logs", job).stdout
    raise AssertionError(f"no checkpoint within {timeout} s; job output:\n{logs[-3000:]}")


def _driver_of(cluster, marker: str) -> psutil.Process:
    """The job's driver process (``genseg ...`` run by the head's job supervisor), found under our head."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for p in psutil.Process(cluster["procs"]["head"].pid).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "jobs.cli" in cmd and marker in cmd and not cmd.startswith("/bin/sh"):
                return p
        time.sleep(0.5)
    raise AssertionError(f"no driver process with {marker!r} under the head")


def _status(cluster, job: str) -> str:
    rows = [ln.split() for ln in genseg(cluster, "jobs", "list").stdout.splitlines()]
    return next(r[1] for r in rows if r and r[0] == job)


def test_a_killed_worker_and_then_a_killed_driver_both_resume_from_the_checkpoint(cluster, shards):
    """--workers 2 --spread --max-failures 1: the training worker on the second node is SIGKILLed after
    a checkpoint and the group restarts from it; later the job's driver is SIGKILLed (the job fails);
    the same command submitted again resumes and finishes: one MLflow run, final metrics, and no
    checkpointed epoch trained twice."""
    epochs = 8
    argv = ["train", "seg", "--data", str(shards), "--workers", "2", "--spread", "--max-failures", "1",
            "--epochs", str(epochs), "--run-name", "dk", *TINY]
    r = genseg(cluster, "submit", "--no-wait", "--", *argv)
    job = _job_id(r.stdout)
    run_dir = cluster["workdir"] / "ray" / "dk"
    at_worker_kill = _wait_for_checkpoint(run_dir, job, cluster)
    victims = _train_workers_of(cluster["procs"]["node2"])
    assert victims, "--spread put no training worker on the second node"
    victims[0].kill()
    victims[0].wait(30)
    _wait("a checkpoint after the restart", lambda: max(_committed_epochs(run_dir)) > max(at_worker_kill), 240)
    assert _status(cluster, job) == "RUNNING"          # the worker's death cost a restart, not the job
    at_driver_kill = _committed_epochs(run_dir)
    _driver_of(cluster, "--run-name dk").kill()         # SIGKILL: no handler, no cleanup
    _wait("the job to fail", lambda: _status(cluster, job) == "FAILED", 60)
    assert max(at_driver_kill) < epochs - 1, f"killed only after the final checkpoint ({at_driver_kill})"

    again = genseg(cluster, "submit", "--", *argv)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "resuming seg run 'dk'" in again.stdout
    client = MlflowClient(tracking_uri=cluster["tracking"])
    run = _run(client, "dk")
    assert run.info.status == "FINISHED" and "val_miou" in run.data.metrics
    steps = [s for s, _ in _epochs_logged(client, run.info.run_id)]
    assert set(steps) == set(range(epochs)) and steps[-1] == epochs - 1, steps
    for s in range(max(at_worker_kill) + 1):     # checkpointed before the first kill: trained once
        assert steps.count(s) == 1, steps
    # each restart goes on from the latest checkpoint: at most the epoch after it is trained again
    assert all(b >= a - 1 for a, b in zip(steps, steps[1:])), steps


def _trial_states(state_dir: Path) -> dict[str, str]:
    """Tune's own record of its trials (the newest experiment_state-*.json): trial id -> status."""
    out = {}
    files = sorted(state_dir.glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    for f in files[-1:]:
        try:
            for t in json.loads(f.read_text())["trial_data"]:
                j = json.loads(t[0])
                out[j["trial_id"]] = j["status"]
        except (OSError, ValueError, KeyError):
            pass
    return out


def test_a_killed_tuning_driver_resumes_without_rerunning_finished_trials(cluster, shards, tmp_path):
    space = cluster["root"] / "space.yaml"
    space.write_text("seg:\n  lr: [0.01, 0.001]\n  class_weights: [none]\n")
    summary = cluster["root"] / "tk.json"
    argv = ["tune", "seg", "--data", str(shards), "--space", str(space), "--epochs", "2", "--set", "width=8",
            "--set", "batch_size=4", "--name", "tk", "--json", str(summary)]
    r = genseg(cluster, "submit", "--no-wait", "--", *argv)
    job = _job_id(r.stdout)
    state = cluster["workdir"] / "tune" / "tk" / "seg"
    _wait("a finished trial in Tune's state", lambda: "TERMINATED" in _trial_states(state).values(), 300)
    finished = sorted(t for t, st in _trial_states(state).items() if st == "TERMINATED")
    _driver_of(cluster, "--name tk").kill()
    _wait("the job to fail", lambda: _status(cluster, job) == "FAILED", 60)
    assert not summary.exists()
    client = MlflowClient(tracking_uri=cluster["tracking"])
    exp = client.get_experiment_by_name("genseg-seg").experiment_id

    def epochs_of(trial_id):
        run, = client.search_runs([exp], f"tags.mlflow.runName = 'tk-{trial_id}'")
        return len(client.get_metric_history(run.info.run_id, "epoch"))

    before = {t: epochs_of(t) for t in finished}
    assert all(n == 2 for n in before.values()), before

    again = genseg(cluster, "submit", "--", *argv)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "resuming the search" in again.stdout and "finished trials are kept" in again.stdout
    # trials that ran in this second job print a line when they end: none of the finished ones
    ran_again = [ln for ln in again.stdout.splitlines() if ln.startswith("[seg] trial ")]
    assert ran_again and not [ln for ln in ran_again if any(t in ln for t in finished)], ran_again
    trials = json.loads(summary.read_text())["stages"]["seg"]["trials"]
    assert len(trials) == 2 and {t["status"] for t in trials} == {"finished"}, trials
    assert {t: epochs_of(t) for t in finished} == before


def _workers_by_epoch(client: MlflowClient, run_id: str) -> list[tuple[int, int]]:
    return [(s, int(v)) for s, v in _epochs_logged(client, run_id, "workers")]


def test_an_elastic_run_shrinks_when_a_node_goes_and_grows_back_when_it_returns(cluster, shards):
    """--workers 1-2 --spread with 2 CPUs per worker, so each node (3 CPUs) holds one worker: the second
    node's raylet is stopped and the run goes on with 1 worker from the latest checkpoint; a node joins
    again and it grows back to 2.  MLflow's `workers` metric shows it epoch by epoch, and the epochs
    never start over.  `genseg jobs stop` ends it."""
    r = genseg(cluster, "submit", "--no-wait", "--env", "GENSEG_ELASTIC_RESIZE_S=3", "--", "train", "seg",
               "--data", str(shards), "--workers", "1-2", "--cpus-per-worker", "2", "--spread", "--max-failures",
               "3", "--epochs", "200", "--run-name", "el", *TINY)
    assert r.returncode == 0, r.stderr
    job = _job_id(r.stdout)
    client = MlflowClient(tracking_uri=cluster["tracking"])

    def history():
        try:
            return _workers_by_epoch(client, _run(client, "el").info.run_id)
        except (AssertionError, AttributeError):
            return []

    def until(what, ok, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = history()
            if ok(h):
                return h
            time.sleep(1)
        logs = genseg(cluster, "jobs", "logs", job).stdout
        raise AssertionError(f"{what}: workers by epoch {history()}; job output:\n{logs[-3000:]}")

    try:
        _wait_for_checkpoint(cluster["workdir"] / "ray" / "el", job, cluster)
        until("two workers at the start", lambda h: len(h) >= 1 and h[-1][1] == 2)
        cluster["remove_node"]()
        until("shrink to one worker", lambda h: any(w == 1 for _, w in h))
        cluster["add_node"]()
        grown = until("grow back to two", lambda h: any(w == 1 for _, w in h) and
                      h[-1][1] == 2 and [w for _, w in h].index(1) < len(h) - 1)
        assert _status(cluster, job) == "RUNNING"
    finally:
        stopped = genseg(cluster, "jobs", "stop", job)
    assert stopped.returncode == 0 and f"job {job}: stop requested, now stopped" in stopped.stdout, stopped.stdout
    workers = [w for _, w in grown]
    first_one = workers.index(1)
    assert set(workers[:first_one]) == {2} and workers[-1] == 2, grown
    steps = [s for s, _ in grown]
    assert steps.count(0) == 1 and all(b >= a - 1 for a, b in zip(steps, steps[1:])), grown


def test_a_cluster_with_token_authentication_takes_the_token_and_refuses_without(tmp_path):
    """A head started with RAY_AUTH_MODE=token: without the token `genseg jobs` / `submit` is one line
    saying so; with RAY_AUTH_TOKEN they work, and the job itself runs."""
    import secrets

    root = Path(tempfile.mkdtemp(prefix="gst", dir="/tmp"))
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "GENSEG_WORKDIR"):
        env.pop(var, None)
    dash = free_port(preferred=0)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port(preferred=0)}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--ray-client-server-port={free_port(preferred=0)}", f"--dashboard-agent-listen-port={free_port(preferred=0)}",
                             f"--temp-dir={root}/ray", "--disable-usage-stats"],
                            env=env, cwd=root, stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"

    def cli(*argv, token_env=None):
        e = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        e["RAY_AUTH_TOKEN_PATH" if token_env is None else "RAY_AUTH_TOKEN"] = \
            str(root / "none") if token_env is None else token_env
        e["HOME"] = str(root)           # no ~/.ray/auth_token of the user's
        return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True,
                              timeout=300, cwd=ROOT, env=e)

    try:
        _wait("the token head", lambda: cli("jobs", "list", "--address", address, token_env=token).returncode == 0,
              120, [head])
        (root / "none").write_text("")
        r = cli("jobs", "list", "--address", address)
        assert r.returncode == 1 and "requires a token" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        r = cli("jobs", "list", "--address", address, token_env="wrong")
        assert r.returncode == 1 and "refused the token" in r.stderr, r.stderr
        out = root / "shards"
        r = cli("submit", "--address", address, "--workdir", str(root / "wd"), "--", "prepare", "--source",
                "synthetic", "--num", "8", "--size", "16x16", "--out", str(out), token_env=token)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert (out / "manifest.json").is_file()
        r = cli("jobs", "list", "--address", address, token_env=token)
        assert r.returncode == 0 and "SUCCEEDED" in r.stdout
    finally:
        _stop(head)
        shutil.rmtree(root, ignore_errors=True)
