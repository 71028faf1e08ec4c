"""Connecting to Ray and MLflow with the embedded defaults (architecture.md), safely beside
other genseg commands on the same machine and workdir.

* Without an address genseg always starts its *own* local Ray (``address="local"``), whatever
  else runs on the machine (a ``ray start --head`` cluster, a stale ``ray_current_cluster``
  file, another genseg command).  ``--ray-address auto`` joins the running cluster.
* Starting a local Ray is serialized by a machine-wide file lock held from choosing the
  dashboard port until the dashboard listens, so commands started together never pick the
  same port.
* A training run name is held by an ``fcntl.flock`` on ``<workdir>/locks/run-<name>.lock`` for
  the whole run, with the holder's PID written in it.  The kernel drops the lock when the
  process ends, however it ends, so a crashed run never leaves its name stuck.
* By default a command shows its own lines only: what training workers print to stdout (the
  per-epoch summaries) reaches the user; Ray's own logs stay in the Ray session directory.
  ``--verbose`` / ``GENSEG_VERBOSE=1`` shows them as Ray prints them.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from genseg.errors import InputError

DEFAULT_WORKDIR = "genseg-runs"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Runtime:
    workdir: Path
    tracking_uri: str
    ray_address: str | None
    verbose: bool = False


class RayAddressError(InputError):
    """``--ray-address`` / ``$RAY_ADDRESS`` names no reachable Ray cluster."""


class RayStartError(RuntimeError):
    """The local Ray could not be started (not the user's input, but still one line, not a traceback)."""


class RunInProgress(InputError):
    """Another process is running (or resuming) the same training run."""


def verbose_from_env() -> bool:
    return os.environ.get("GENSEG_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(workdir: str | None, tracking_uri: str | None, ray_address: str | None,
            verbose: bool = False) -> Runtime:
    from genseg.tracking import default_tracking_uri

    wd = Path(workdir or os.environ.get("GENSEG_WORKDIR") or DEFAULT_WORKDIR).resolve()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(wd)
    return Runtime(wd, uri, ray_address or os.environ.get("RAY_ADDRESS") or None, verbose or verbose_from_env())


# ------------------------------------------------------------------ what the user sees

# Driver-side loggers whose INFO/WARNING lines are Ray's or MLflow's bookkeeping, not news for a user.
_QUIET_LOGGERS = {"mlflow.store.db.utils": logging.WARNING, "alembic": logging.WARNING,
                  "ray.data._internal.progress": logging.ERROR}
# Lines Ray itself writes to a worker's stdout; everything a worker writes to stderr is Ray's logs
# (Python logging, warnings, C++ logs) and is left in the session directory.
_RAY_STDOUT_NOISE = re.compile(r"Progress bars (for operators )?disabled|Reporting training result|"
                               r"execution finished in|^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\]|"
                               r"__ray_tqdm_magic_token__")
_LIBRARY_FILE = re.compile(r"site-packages[/\\](ray|mlflow)[/\\]")
# Messages the raylet pushes to every driver that are about Ray's own actors, not the user's work
_RAYLET_NOISE = re.compile(r"PYTHON worker processes have been started|ServeController\.graceful_shutdown")


def quiet_logging(verbose: bool) -> None:
    """Keep the driver's own Ray/MLflow bookkeeping lines out of a command's output."""
    if verbose:
        return
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # advice to library authors (deprecations, "add type hints to predict"), not to a genseg user.  A
    # filter would not do: MLflow wraps calls in catch_warnings() + simplefilter("once"), ahead of ours.
    if not getattr(warnings.showwarning, "genseg_quiet", False):
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if not _LIBRARY_FILE.search(str(filename)):
                shown(message, category, filename, lineno, file, line)

        showwarning.genseg_quiet = True
        warnings.showwarning = showwarning


def _print_worker_output(data: dict) -> None:
    """Stand-in for Ray's log printer in quiet mode: the stdout lines of worker processes (the
    training loops' progress lines), printed as they are, without Ray's ``(pid=...)`` prefix."""
    if data.get("is_err") or not str(data.get("pid", "")).isdigit():   # stderr, raylet, gcs_server
        return
    for line in data.get("lines", ()):
        if line.strip() and not _RAY_STDOUT_NOISE.search(line):
            print(line, file=sys.stdout, flush=True)


def _show_only_worker_output() -> None:
    try:   # Ray's driver-side log dispatcher (private API): fall back to Ray's own printing if it moved
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if not any(name == "ray_print_logs" for name, _ in getattr(dispatcher, "handlers", [])):
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("genseg_print_logs", _print_worker_output)
    # the raylet's messages to the driver go through this function (ray._private.worker.listen_error_messages)
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "genseg_filtered", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if not any(_RAYLET_NOISE.search(line) for line in data.get("lines", ())):
            original(data, *args, **kwargs)

    print_to_stdstream.genseg_filtered = True
    ray_worker.print_to_stdstream = print_to_stdstream


def ray_logs_dir() -> str | None:
    """Where this process's Ray session keeps its logs (named in failure messages)."""
    try:
        import ray

        node = ray._private.worker._global_node
        return node.get_logs_dir_path() if node is not None else None
    except Exception:   # not initialised, or Ray's internals moved: the message just omits it
        return None


# ------------------------------------------------------------------ Ray

DATA_TASK_CPU = 1.0        # what one Ray Data read task asks for


def local_cpus(rt: Runtime) -> float | None:
    """The CPUs of the local Ray this process started, or None: Ray not started here, or a cluster
    joined (``--ray-address``, ``RAY_ADDRESS``, a Ray Job), which an autoscaler may still grow."""
    if getattr(rt, "ray_address", None) not in (None, "", "local"):
        return None
    import ray

    return float(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else None


def check_room_for_data(held: float, cluster_cpus: float | None, what: str, fix: str) -> None:
    """Training that holds ``held`` CPUs must leave one for a Ray Data read task, or it waits for its
    data forever with nothing said (on 4 logical CPUs, 4 one-CPU workers leave none)."""
    if not cluster_cpus:
        return
    left = cluster_cpus - held
    if left + 1e-9 < DATA_TASK_CPU:
        raise InputError(f"{what} leave {max(left, 0):.2f} of Ray's {cluster_cpus:g} CPUs for Ray Data, whose "
                         f"read tasks need {DATA_TASK_CPU:g} each, so training would wait for its data forever; "
                         f"{fix}")


def init_ray(rt: Runtime, num_cpus: int | None = None) -> None:
    """Start (or join) Ray.  A local cluster gets logical CPUs beyond the physical cores so a
    Train run and its Ray Data pipeline both get scheduled on small machines (ray-notes.md)."""
    import ray

    if ray.is_initialized():
        return
    # Ray Data logs every dataset execution at INFO; a CLI user wants our summary lines only
    import ray.data  # noqa: F401  (configures its loggers on import; quiet them after)

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    quiet_logging(rt.verbose)
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False     # two lines per dataset per epoch from the split coordinator
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if rt.ray_address and rt.ray_address != "local":
        _join(rt.ray_address)
    else:
        _start_local(num_cpus)
    sigterm_as_interrupt()       # ray.init installs a SIGTERM handler that aborts the driver: ours again
    if not rt.verbose:
        _show_only_worker_output()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_interrupt():
    """Make SIGTERM (``kill``, a container stop, a scheduler's time limit) stop a command the way
    Ctrl-C does: the local Ray it started is shut down and a training run says how to resume.
    -> the previous handler (None off the main thread, where handlers cannot be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def _join(address: str) -> None:
    import ray

    if address != "auto":
        check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    except ConnectionError as exc:   # "auto" with no cluster running, or a GCS that went away
        raise RayAddressError(f"cannot join the Ray cluster at {address!r} (--ray-address / $RAY_ADDRESS): "
                              f"{_first_line(exc)}") from None


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """A short TCP connect to the cluster's address: ``ray.init`` itself retries an unreachable
    GCS for minutes before it gives up."""
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "ray"):
        hint = " (http://HOST:8265 is a dashboard address, for `genseg submit`)" if scheme.startswith("http") else ""
        raise RayAddressError(f"--ray-address {address}: expected HOST:PORT of the cluster's head (e.g. "
                              f"10.0.0.5:6379), ray://HOST:10001 or auto{hint}")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayAddressError(f"--ray-address {address}: expected HOST:PORT, e.g. 10.0.0.5:6379 or ray://HOST:10001")
    why = unreachable(host.strip("[]"), int(port), timeout)
    if why:
        raise RayAddressError(f"cannot reach a Ray cluster at {address} (--ray-address / $RAY_ADDRESS): "
                              f"{host}:{port} does not answer ({why}); is the cluster running?")


def unreachable(host: str, port: int, timeout: float = 3.0) -> str | None:
    """Why a short TCP connect to ``host:port`` fails, or None when something answers."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def _start_local(num_cpus: int | None) -> None:
    import ray

    cpus = num_cpus or int(os.environ.get("GENSEG_NUM_CPUS", 0)) or max(4, 2 * (os.cpu_count() or 1))
    # The dashboard serves the State API, which Ray Train's placement-group cleaner polls to see whether
    # the run's controller is alive.  Without a dashboard it warns every few seconds and can never
    # clean up.  Worse, it finds "the" API server by looking for Ray instances on the machine, so
    # with a second instance running (another genseg command, `ray start --head`) it can ask the
    # wrong cluster, get "no such actor", and tear down a healthy run's workers.  Pin the address:
    # the raylet and every worker inherit this process's environment.
    # The lock makes "find a free port, start Ray on it" one step for every genseg on the machine.
    with machine_lock("ray-start"):
        port = dashboard_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # address="local": never join whatever cluster RAY_ADDRESS or /tmp/ray/ray_current_cluster
        # points at (that is what --ray-address auto is for)
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port, logging_level=logging.WARNING, configure_logging=True,
                     log_to_driver=True)
        except Exception as exc:   # e.g. "The current node timed out during startup" on an overloaded machine
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise RayStartError(f"could not start a local Ray: {first} (is the machine out of memory or "
                                f"overloaded?); Ray's logs: {ray_logs_dir() or '/tmp/ray/session_latest/logs'}"
                                ) from None
        _wait_listening("127.0.0.1", port, timeout=30)


def dashboard_port(preferred: int = 8265) -> int:
    """``$GENSEG_DASHBOARD_PORT``, else Ray's usual 8265 when it is free, else any free port."""
    if os.environ.get("GENSEG_DASHBOARD_PORT"):
        text = os.environ["GENSEG_DASHBOARD_PORT"].strip()
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise InputError(f"GENSEG_DASHBOARD_PORT={text!r} is not a TCP port number")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", int(text)))
            except OSError:
                raise InputError(f"GENSEG_DASHBOARD_PORT={text}: the port is in use (another Ray dashboard?); "
                                 f"unset it to let genseg pick a free one") from None
        return int(text)
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1 for the Ray dashboard")


def _wait_listening(host: str, port: int, timeout: float) -> bool:
    """Until something accepts connections on ``host:port`` (the next genseg must see it taken)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def interruptible(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a helper thread, so that Ctrl-C reaches the main thread as a plain
    KeyboardInterrupt at once.  Called from the main thread, Ray Train's ``fit()`` installs its own
    SIGINT handler, which aborts the run and ends the process with status 1 and no word of why."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:   # handed to the main thread; also silences Ray's teardown on Ctrl-C
            box["error"] = exc

    t = threading.Thread(target=target, name="genseg-job", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["value"]


# ------------------------------------------------------------------ locks

def _lock_dir_for_machine() -> Path:
    # one place for every genseg process of this user, whatever its TMPDIR: ports are machine-wide
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    return base


@contextlib.contextmanager
def machine_lock(name: str, timeout: float = 300.0) -> Iterator[None]:
    """A blocking machine-wide lock (released by the kernel if the holder dies)."""
    path = _lock_dir_for_machine() / f"genseg-{name}-{os.getuid()}.lock"
    with _flock(path, timeout):
        yield


@contextlib.contextmanager
def workdir_lock(workdir: Path, name: str, timeout: float = 300.0) -> Iterator[None]:
    """A blocking lock on ``<workdir>/locks/<name>.lock``."""
    d = Path(workdir) / "locks"
    d.mkdir(parents=True, exist_ok=True)
    with _flock(d / f"{name}.lock", timeout):
        yield


@contextlib.contextmanager
def _flock(path: Path, timeout: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)   # not inherited by Ray's child processes
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout:.0f}s for the lock {path}; the process holding it "
                                       f"seems stuck") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)   # closing drops the lock


def check_run_name(name: str) -> None:
    if not RUN_NAME.fullmatch(name):
        raise InputError(f"--run-name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                         f"starting with a letter or digit)")


@contextlib.contextmanager
def run_lock(workdir: Path, run_name: str) -> Iterator[Path]:
    """Hold the training run ``run_name`` for the duration of the block, or raise RunInProgress
    naming the process that holds it.  The lock file stays (deleting it would race with a
    process about to lock it); only the lock on it matters."""
    check_run_name(run_name)
    d = Path(workdir) / "locks"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"run-{run_name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(10):   # the holder writes its PID right after it takes the lock
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
                if holder:
                    break
                time.sleep(0.05)
            raise RunInProgress(f"run '{run_name}' is in progress in another process ({holder or 'PID unknown'}); "
                                f"wait for it to finish, or pick another --run-name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_run(workdir: Path, run_name: str | None, prefix: str) -> Iterator[str]:
    """``run_lock`` for a given name; without one, for a new ``<prefix>-<timestamp>`` name that no
    run has used (two commands started in the same second would otherwise share one run)."""
    if run_name:
        with run_lock(workdir, run_name):
            yield run_name
        return
    base = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1, 1000):
        name = base if i == 1 else f"{base}-{i}"
        if (Path(workdir) / "locks" / f"run-{name}.lock").exists() or (Path(workdir) / "ray" / name).exists():
            continue   # used before, or being taken right now by a command started in the same second
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(run_lock(workdir, name))
        except RunInProgress:
            continue
        with stack:
            yield name
        return
    raise RunInProgress(f"no free run name {base}-N; pass --run-name")


# ------------------------------------------------------------------ MLflow

def prepare_tracking(rt: Runtime, experiment: str | None = None) -> None:
    """Create the MLflow store (and ``experiment``) once, under a workdir lock: two commands
    started together on a fresh workdir would otherwise both create the tables or the
    experiment, and one would fail.  A sqlite store is switched to WAL journaling so commands
    that read it (eval, sample, edit) never wait on a training run writing its metrics."""
    from mlflow.tracking import MlflowClient

    from genseg import tracking

    with workdir_lock(rt.workdir, "mlflow"):
        tracking.setup(rt.workdir, rt.tracking_uri)
        MlflowClient().search_experiments(max_results=1)   # creates the tables of a new store
        if rt.tracking_uri.startswith("sqlite:///"):
            use_wal(Path(rt.tracking_uri.removeprefix("sqlite:///")))
        if experiment:
            tracking.experiment_id(experiment, rt.workdir)


def use_wal(db: Path) -> None:
    """Switch a sqlite database to write-ahead logging (persistent; a no-op when it already is).
    Best effort: a database busy right now keeps its mode, which is only slower."""
    try:
        con = sqlite3.connect(str(db), timeout=10)
        try:
            con.execute("PRAGMA journal_mode=WAL").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        pass


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
