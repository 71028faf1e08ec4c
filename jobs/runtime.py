"""Connecting to Ray and MLflow with the embedded defaults (architecture.md)."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKDIR = "genseg-runs"


@dataclass(frozen=True)
class Runtime:
    workdir: Path
    tracking_uri: str
    ray_address: str | None


def resolve(workdir: str | None, tracking_uri: str | None, ray_address: str | None) -> Runtime:
    from genseg.tracking import default_tracking_uri

    wd = Path(workdir or os.environ.get("GENSEG_WORKDIR") or DEFAULT_WORKDIR).resolve()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(wd)
    return Runtime(wd, uri, ray_address or os.environ.get("RAY_ADDRESS"))


def init_ray(rt: Runtime, num_cpus: int | None = None) -> None:
    """Start (or join) Ray.  A local cluster gets logical CPUs beyond the physical cores so a
    Train run and its Ray Data pipeline both get scheduled on small machines (ray-notes.md)."""
    import ray

    if ray.is_initialized():
        return
    # Ray Data logs every dataset execution at INFO; a CLI user wants our summary lines only
    import ray.data  # noqa: F401  (configures its loggers on import; quiet them after)

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False     # two lines per dataset per epoch from the split coordinator
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if rt.ray_address:
        ray.init(address=rt.ray_address, logging_level=logging.WARNING)
        return
    cpus = num_cpus or int(os.environ.get("GENSEG_NUM_CPUS", 0)) or max(4, 2 * (os.cpu_count() or 1))
    # The dashboard serves the State API, which Ray Train's placement-group cleaner polls to see whether
    # the run's controller is alive.  Without a dashboard it warns every few seconds and can never
    # clean up.  Worse, it finds "the" API server by looking for Ray instances on the machine, so
    # with a second instance running (another genseg command, `ray start --head`) it can ask the
    # wrong cluster, get "no such actor", and tear down a healthy run's workers.  Pin the address:
    # the raylet and every worker inherit this process's environment.
    port = dashboard_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)


def dashboard_port(preferred: int = 8265) -> int:
    """``$GENSEG_DASHBOARD_PORT``, else Ray's usual 8265 when it is free, else any free port."""
    if os.environ.get("GENSEG_DASHBOARD_PORT"):
        return int(os.environ["GENSEG_DASHBOARD_PORT"])
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1 for the Ray dashboard")
