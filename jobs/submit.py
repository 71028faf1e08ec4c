"""``genseg submit`` and ``genseg jobs``: run genseg commands on a Ray cluster as Ray Jobs.

``genseg submit --address http://HEAD:8265 -- train seg --data /shared/camvid-shards`` packs this
source tree as the job's ``working_dir`` (without the virtual environment, run outputs, caches and
data: :data:`EXCLUDES`), hands the job the workdir and the MLflow tracking URI as environment
variables, streams the job's output and exits with the job's status (0 succeeded, 1 failed,
130 stopped).  The command after ``--`` is checked here first, so a typo is one line before
anything is uploaded.  Inside the job genseg joins the cluster (Ray sets ``RAY_ADDRESS``).

Token authentication (``RAY_AUTH_MODE=token`` on the cluster): the token is read from
``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` and sent as a bearer token;
a cluster that refuses it is one line saying so.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from genseg.errors import InputError
from jobs.runtime import unreachable

# what a job never needs from the source tree (Ray's own exclusion syntax: gitignore-style patterns)
EXCLUDES = [".git", ".venv", "venv", "**/__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".mypy_cache",
            ".ruff_cache", "genseg-runs", "mlruns", "mlartifacts", "*.db", "bench/runs", "bench/results",
            "shared", "node_modules", "*.ckpt", "*.safetensors", "*.parquet", "*.pt", "*.pth"]
# commands that make no sense inside a job
NOT_SUBMITTABLE = ("submit", "jobs")
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class JobError(InputError):
    """A cluster that cannot be reached, refuses us, or has no such job."""


def project_root() -> Path:
    """The source tree to ship: the checkout this genseg runs from."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "genseg").is_dir():
        raise JobError(f"genseg runs from {root}, which is not a genseg source checkout; `genseg submit` ships "
                       f"the checkout as the job's working_dir: run it from a clone of the repository")
    return root


def address_of(address: str | None) -> str:
    """``--address``, else ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS`` when they are http(s), else the local
    dashboard; always ``http(s)://HOST:PORT``."""
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not addr and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        addr = os.environ["RAY_ADDRESS"]
    addr = (addr or DEFAULT_ADDRESS).rstrip("/")
    if "://" not in addr:
        addr = "http://" + addr
    u = urlparse(addr)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise JobError(f"--address {address!r}: expected the cluster's dashboard, http://HOST:8265")
    return addr


def _token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        text = Path(path).read_text().strip()
    except OSError:
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file") from None
        return None
    return text or None


def client(address: str | None):
    """A JobSubmissionClient for ``address``, or one line on why there is none."""
    addr = address_of(address)
    u = urlparse(addr)
    port = u.port or (443 if u.scheme == "https" else 80)
    why = unreachable(u.hostname, port, timeout=5)
    if why:
        raise JobError(f"cannot reach the Ray cluster's dashboard at {addr} (--address): "
                       f"{why}; is the cluster running (`ray start --head`)?")
    from ray.job_submission import JobSubmissionClient

    token = _token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # Ray's client lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override the address it is given (e.g.
    # one a local genseg command set in this environment): the address chosen here must win
    os.environ["RAY_API_SERVER_ADDRESS"] = addr
    try:
        return JobSubmissionClient(addr, headers=headers)
    except Exception as exc:   # a 401/403, or something at that port that is not a Ray dashboard
        raise JobError(_why(exc, addr)) from None


def _why(exc: BaseException, addr: str, otherwise: str | None = None) -> str:
    text = " ".join(str(exc).split())
    if "401" in text or "Unauthorized" in text or "Authentication required" in text:
        return (f"the Ray cluster at {addr} requires a token (token authentication is on): set RAY_AUTH_TOKEN "
                f"(see `ray get-auth-token` on the head)")
    if "403" in text or "Forbidden" in text or "Authentication failed" in text:
        return f"the Ray cluster at {addr} refused the token in RAY_AUTH_TOKEN / ~/.ray/auth_token"
    return f"{otherwise or f'{addr} did not answer as a Ray dashboard'}: {text[:300]}"


def check_forwarded(argv: list[str]) -> list[str]:
    """The genseg command to run in the job, parsed here first (usage errors end here, not in the job)."""
    from jobs.cli import build_parser

    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv and argv[0] == "genseg":
        argv = argv[1:]
    if not argv:
        raise JobError("no command to submit: genseg submit --address URL -- train seg --data DIR ...")
    if argv[0] in NOT_SUBMITTABLE:
        raise JobError(f"`genseg {argv[0]}` runs on your machine, not as a job")
    build_parser().parse_args(argv)   # exits 2 with one line on a usage mistake
    return argv


def entrypoint(argv: list[str], python: str = "python") -> str:
    """The job's shell command: this checkout's CLI, run from the unpacked working_dir."""
    return shlex.join([python, "-m", "jobs.cli", *argv])


def job_env(workdir: str | None, tracking_uri: str | None, extra: list[str]) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    if workdir:
        env["GENSEG_WORKDIR"] = workdir
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise JobError(f"--env {item!r}: expected NAME=VALUE")
        env[key] = value
    return env


def submit(args, rt) -> int:
    argv = check_forwarded(args.command_args)
    c = client(args.address)
    workdir, uri = str(rt.workdir), rt.tracking_uri
    if uri.startswith("sqlite:") and urlparse(address_of(args.address)).hostname not in ("127.0.0.1", "localhost"):
        print(f"note: the job tracks to {uri}, a file that only processes on the head node can write; on a "
              f"cluster run `mlflow server` and pass --tracking-uri http://HOST:5000", file=sys.stderr)
    runtime_env = {"working_dir": str(project_root()), "excludes": EXCLUDES,
                   "env_vars": job_env(workdir, uri, args.env)}
    try:
        job_id = c.submit_job(entrypoint=entrypoint(argv, args.python), runtime_env=runtime_env,
                              submission_id=args.job_id, metadata={"genseg.command": shlex.join(argv)})
    except Exception as exc:
        raise JobError(_why(exc, address_of(args.address), "the cluster refused the job")) from None
    print(f"submitted job {job_id} to {address_of(args.address)}: genseg {shlex.join(argv)}", flush=True)
    print(f"  workdir {workdir}, tracking {uri}", flush=True)
    if args.no_wait:
        print(f"follow it with: genseg jobs logs {job_id} --follow --address {address_of(args.address)}")
        return 0
    return follow(c, job_id, address_of(args.address))


def follow(c, job_id: str, addr: str) -> int:
    """Stream a job's output until it ends -> its exit status.  Ctrl-C leaves the job running."""
    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        try:
            asyncio.run(tail())
        except RuntimeError:   # the log stream closed early (a restarted dashboard): poll the status instead
            pass
        status = _wait(c, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on. Stop it with: genseg jobs stop {job_id} --address {addr}",
              file=sys.stderr)
        return 130
    info = c.get_job_info(job_id)
    msg = f"job {job_id} {status.lower()}"
    if status != "SUCCEEDED" and info.message:
        msg += f": {' '.join(info.message.split())[:300]}"
    print(msg, file=sys.stderr if status != "SUCCEEDED" else sys.stdout, flush=True)
    return TERMINAL.get(status, 1)


def _wait(c, job_id: str, timeout: float | None = None) -> str:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = _name(c.get_job_status(job_id))
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(1)


def _name(status) -> str:
    return str(getattr(status, "value", status))


def jobs_command(args, rt) -> int:
    c = client(args.address)
    if args.action == "list":
        try:
            rows = sorted(c.list_jobs(), key=lambda j: j.start_time or 0)
        except Exception as exc:   # e.g. a token the cluster refuses
            raise JobError(_why(exc, address_of(args.address), "cannot list the cluster's jobs")) from None
        if not rows:
            print("no jobs")
        for j in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
            command = (j.metadata or {}).get("genseg.command") or j.entrypoint
            print(f"{j.submission_id or j.job_id}  {_name(j.status):9s}"
                  f"  {when}  {command}")
        return 0
    if not args.id:
        raise JobError(f"genseg jobs {args.action} needs a job id (see `genseg jobs list`)")
    try:
        c.get_job_info(args.id)
    except Exception as exc:
        why = _why(exc, address_of(args.address))
        if "token" in why:
            raise JobError(why) from None
        raise JobError(f"no job {args.id!r} on {address_of(args.address)} (see `genseg jobs list`)") from None
    if args.action == "logs":
        if args.follow:
            return follow(c, args.id, address_of(args.address))
        sys.stdout.write(c.get_job_logs(args.id))
        return 0
    # stop
    stopped = c.stop_job(args.id)
    status = _wait(c, args.id, timeout=30)
    print(f"job {args.id}: {'stop requested, now ' if stopped else 'already '}{status.lower()}")
    return 0
