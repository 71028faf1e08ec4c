"""Several genseg commands at once on one machine and one workdir.

Two trains started together both finish (each its own local Ray and dashboard port, each its own
run); a run name in progress is refused naming the process that holds it; `eval` works beside a
running training on the same sqlite store; a `ray start --head` cluster does not capture plain
commands, and `--ray-address auto` joins it.  Everything runs as real `genseg` processes.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_bad_inputs import as_in_a_terminal, write_shards

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
TINY = ["--workers", "1", "--batch-size", "2", "--set", "width=8"]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           **extra}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS", "GENSEG_DASHBOARD_PORT"):
        env.pop(k, None)
    return env


def genseg(*argv: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *argv], cwd=ROOT, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal, **kw)


def finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()                                             # never leave a genseg (and its Ray) behind
        out, err = p.communicate()
        raise AssertionError(f"{p.args} did not finish in {timeout}s: {out} {err}") from None
    return p.returncode, out, err


def wait_for_line(p: subprocess.Popen, prefix: str, timeout: float = 400) -> list[str]:
    """Read ``p``'s stdout until a line starts with ``prefix`` -> the lines read."""
    seen, deadline = [], time.monotonic() + timeout
    for line in p.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
        assert time.monotonic() < deadline, f"no '{prefix}' line in time: {seen}"
    raise AssertionError(f"process ended before a '{prefix}' line: {seen} {p.stderr.read()}")


def metric_steps(tracking_uri: str, run_name: str, key: str = "epoch") -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("genseg-seg")
    run = client.search_runs([exp.experiment_id], filter_string=f"tags.`genseg.run_name` = '{run_name}'")[0]
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@pytest.fixture(scope="module")
def two_trains(tmp_path_factory):
    """Two `genseg train seg` with no --run-name, started in the same instant on a fresh workdir
    (they once both took dashboard port 8265 and the same timestamped run name)."""
    d = tmp_path_factory.mktemp("busy")
    data = write_shards(d / "shards", {"train": 8, "val": 4})
    argv = ["train", "seg", "--data", str(data), "--epochs", "1", "--workdir", str(d / "wd"), *TINY]
    procs = [genseg(*argv), genseg(*argv, env=_env(GENSEG_VERBOSE="1"))]   # the second one shows Ray's logs
    return d, data, [finish(p) for p in procs]


def test_two_trains_started_together_both_finish(two_trains):
    d, _, results = two_trains
    for code, out, err in results:
        assert code == 0, err
        assert "epoch 1/1:" in out and "Traceback" not in err
    names = [out.split("run '")[1].split("'")[0] for _, out, _ in results]
    assert len(set(names)) == 2, names                                  # two runs, not one shared
    uri = f"sqlite:///{d / 'wd' / 'mlflow.db'}"
    assert [metric_steps(uri, n) for n in names] == [[0], [0]]          # each run's own history


RAY_NOISE = ("core_worker.cc", "gcs_actor_scheduler", "TrainingReport(", "PYTHON worker processes",
             "Progress bars disabled", "RayDeprecationWarning", "UserWarning", "pid=")


def test_output_is_genseg_lines_unless_verbose(two_trains):
    """By default a train shows its own progress and results; Ray's logs come back with GENSEG_VERBOSE=1."""
    (_, quiet, quiet_err), (_, loud, loud_err) = two_trains[2]
    shown = [ln for ln in (quiet + quiet_err).splitlines() if ln.strip()]
    assert not [ln for ln in shown if any(n in ln for n in RAY_NOISE)], shown
    assert len(shown) <= 8, shown                                       # start, one per epoch, results
    assert shown[0].startswith("starting seg run") and any(ln.startswith("epoch 1/1: train loss") for ln in shown)
    assert "(RayTrainWorker pid=" in loud + loud_err and "(TrainController pid=" in loud + loud_err


def test_run_in_progress_is_refused_and_eval_works_beside_it(two_trains):
    d, data, _ = two_trains
    wd = str(d / "wd")
    long = genseg("train", "seg", "--data", str(data), "--epochs", "40", "--run-name", "long", "--workdir", wd, *TINY,
                  start_new_session=True)
    try:
        wait_for_line(long, "epoch 1/40")                    # it is training now

        code, out, err = finish(genseg("train", "seg", "--data", str(data), "--epochs", "40", "--run-name", "long",
                                       "--workdir", wd, *TINY), timeout=120)
        assert code != 0 and "Traceback" not in err
        assert err.strip().count("\n") == 0 and f"run 'long' is in progress in another process (pid {long.pid} " in err
        assert long.poll() is None                           # refused while the first one still runs

        # reads the sqlite registry and store while `long` writes its metrics and checkpoints
        code, out, err = finish(genseg("eval", "seg", "--data", str(data), "--workdir", wd), timeout=300)
        assert code == 0, err
        assert "mIoU" in out and "database is locked" not in err
        assert long.poll() is None, "the training ended before the eval ran beside it"
    finally:
        if long.poll() is None:
            os.killpg(long.pid, signal.SIGINT)               # Ctrl-C: ends with the resume line, exit 130
        code, out, err = finish(long, timeout=120)
    assert code == 130 and "--run-name long" in err, err
    steps = metric_steps(f"sqlite:///{d / 'wd' / 'mlflow.db'}", "long")
    assert steps == list(range(len(steps))) and steps, steps  # one history, no second writer interleaved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ray_start_cluster_does_not_capture_plain_commands_and_auto_joins_it():
    """`ray start --head` writes ray_current_cluster; plain genseg commands used to join it and die
    with "num_cpus and num_gpus must not be provided".  The test's cluster has its own temp dir and
    ports, and RAY_TMPDIR points genseg at that temp dir (where it looks for ray_current_cluster)."""
    tmp = Path(tempfile.mkdtemp(prefix="gsray", dir="/tmp"))   # short: Ray's socket paths live under it
    env = _env(RAY_TMPDIR=str(tmp))
    ray_dir = tmp / "ray"
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--temp-dir", str(ray_dir),
         "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(_free_port()),
         "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
         "--num-cpus", "2", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (ray_dir / "ray_current_cluster").exists():
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)

        def sessions() -> set[str]:
            return {p.name for p in ray_dir.glob("session_2*")}

        theirs = sessions()
        argv = ["prepare", "--source", "synthetic", "--num", "6", "--size", "16x16", "--workdir", str(tmp / "wd")]
        code, out, err = finish(genseg(*argv, "--out", str(tmp / "own"), env=env), timeout=300)
        assert code == 0, err
        assert "wrote" in out and "Traceback" not in err
        assert len(sessions() - theirs) == 1                 # it started its own local Ray beside the cluster

        mine = sessions()
        code, out, err = finish(genseg(*argv, "--out", str(tmp / "joined"), "--ray-address", "auto", env=env), timeout=300)
        assert code == 0, err
        assert "wrote" in out and sessions() == mine         # it joined the running cluster: no new Ray session
    finally:
        head.send_signal(signal.SIGTERM)                     # never `ray stop`: other Rays run on this machine
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
