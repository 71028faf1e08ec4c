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
