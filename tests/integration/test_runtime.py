"""The local Ray that genseg starts: its State API must answer for this cluster, even when another
Ray instance runs on the same machine (Ray Train's placement-group cleaner tears a run down when
the State API says its controller does not exist)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

OTHER_RAY = textwrap.dedent("""
    import sys
    import ray
    ray.init(num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[1]))
    print("ready", flush=True)
    sys.stdin.read()          # until the test closes our stdin
    ray.shutdown()
""")


def test_dashboard_is_local_and_pinned(ray_cluster):
    """Every process of the cluster is pointed at this cluster's own dashboard, on loopback only."""
    url = os.environ["RAY_API_SERVER_ADDRESS"]
    assert url.startswith("http://127.0.0.1:")
    assert ray_cluster._private.worker.global_worker.node.address_info["webui_url"] == url.removeprefix("http://")

    @ray_cluster.remote(num_cpus=0)
    def worker_env() -> str | None:
        return os.environ.get("RAY_API_SERVER_ADDRESS")

    assert ray_cluster.get(worker_env.remote(), timeout=120) == url


def test_state_api_answers_for_this_cluster_with_another_ray_running(ray_cluster):
    import ray
    from jobs.runtime import dashboard_port

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
    other = subprocess.Popen([sys.executable, "-c", OTHER_RAY, str(dashboard_port(preferred=0))], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ready", "the second Ray instance did not start"

        @ray.remote(num_cpus=0)
        class Probe:
            def ping(self) -> bool:
                return True

        @ray.remote(num_cpus=0)
        def state_of(actor_id: str):
            from ray.util.state import get_actor

            found = get_actor(actor_id, timeout=30)
            return None if found is None else found.state

        probe = Probe.remote()
        assert ray.get(probe.ping.remote())
        # the question the cleaner asks from inside the cluster, about an actor of this cluster
        assert ray.get(state_of.remote(probe._actor_id.hex()), timeout=120) == "ALIVE"
        ray.kill(probe)
    finally:
        other.stdin.close()
        try:
            other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            other.kill()


HOLD_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from jobs.runtime import run_lock
    with run_lock(Path(sys.argv[1]), "r1"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    """A run in progress is refused naming its PID; a run that crashed (SIGKILL: no cleanup at all)
    leaves nothing stuck."""
    from jobs.runtime import RunInProgress, run_lock

    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInProgress, match=f"run 'r1' is in progress in another process \\(pid {holder.pid} "):
            with run_lock(tmp_path, "r1"):
                pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    with run_lock(tmp_path, "r1"):                      # the kernel dropped the dead holder's lock
        with pytest.raises(RunInProgress):              # and this process holds it now
            with run_lock(tmp_path, "r1"):
                pass


def test_default_run_names_are_never_shared(tmp_path):
    """Two commands started in the same second get two runs; a finished run's name is not reused."""
    from jobs.runtime import hold_run

    with hold_run(tmp_path, None, "seg") as a, hold_run(tmp_path, None, "seg") as b:
        assert a != b and a.startswith("seg-") and b.startswith(a)
    with hold_run(tmp_path, None, "seg") as c:
        assert c not in (a, b)


def test_quiet_output_passes_worker_lines_only(capsys):
    """What reaches the user from the cluster by default: a worker's own stdout lines, without Ray's
    prefix; not Ray's logs (stderr), its daemons, nor the lines Ray itself prints to stdout."""
    from jobs.runtime import _print_worker_output

    _print_worker_output({"pid": "1234", "is_err": False, "actor_name": "RayTrainWorker",
                          "lines": ["epoch 1/2: train loss 1.0", "Reporting training result 1: TrainingReport(...)"]})
    _print_worker_output({"pid": "1234", "is_err": True, "lines": ["[2026-11-27 02:25:09,783 E 1 2] core_worker.cc"]})
    _print_worker_output({"pid": "raylet", "is_err": False, "lines": ["WARNING: 8 PYTHON worker processes"]})
    _print_worker_output({"pid": "gcs_server", "is_err": False, "lines": ["Failed to kill actor"]})
    out, err = capsys.readouterr()
    assert out == "epoch 1/2: train loss 1.0\n" and err == ""
