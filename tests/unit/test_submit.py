"""`genseg submit` / `genseg jobs` without a cluster: what the job ships, the command it runs, the
environment it gets, and the one-line failures (an unreachable dashboard, an unreachable or
non-MLflow tracking server, `--workers` ranges)."""
import http.server
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from jobs import submit
from serve_app.server import free_port
from jobs.cli import _workers, build_parser
from jobs.runner import describe_workers, steps_per_epoch

ROOT = Path(__file__).resolve().parents[2]


def test_the_job_ships_code_and_configs_but_no_venv_outputs_caches_or_data(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "src"
    keep = ["genseg/models/fcn.py", "jobs/cli.py", "serve_app/config.yaml", "bench/configs/camvid.yaml",
            "pyproject.toml", "README.md"]
    drop = [".venv/bin/python", ".git/HEAD", "genseg/__pycache__/fcn.cpython-311.pyc", "genseg-runs/mlflow.db",
            "genseg-runs/ray/run/checkpoint_0/model.safetensors", "bench/runs/camvid/shards/train/part-0.parquet",
            "bench/results/big.png", "mlruns/0/meta.yaml", "genseg.egg-info/PKG-INFO", "shards/val/x.parquet",
            "weights.pt", ".pytest_cache/v/cache"]
    for rel in keep + drop:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    out = tmp_path / "pkg.zip"
    create_package(str(tree), out, include_gitignore=False, excludes=submit.EXCLUDES)
    names = {n.rstrip("/") for n in zipfile.ZipFile(out).namelist()}
    assert set(keep) <= names, set(keep) - names
    leaked = [rel for rel in drop if rel in names]
    assert not leaked, leaked


def test_the_forwarded_command_is_checked_here_and_quoted_for_the_shell():
    argv = submit.check_forwarded(["--", "genseg", "train", "seg", "--data", "/shared/my shards", "--epochs", "3"])
    assert argv == ["train", "seg", "--data", "/shared/my shards", "--epochs", "3"]
    assert submit.entrypoint(argv) == "python -m jobs.cli train seg --data '/shared/my shards' --epochs 3"
    assert submit.entrypoint(["prepare"], "/opt/venv/bin/python").startswith("/opt/venv/bin/python -m jobs.cli ")
    with pytest.raises(SystemExit) as e:     # a typo ends here, before anything is uploaded
        submit.check_forwarded(["train", "seg", "--data", "d", "--epocs", "3"])
    assert e.value.code == 2
    for bad in (["submit", "--", "train"], ["jobs", "list"], []):
        with pytest.raises(submit.JobError):
            submit.check_forwarded(bad)


def test_submit_keeps_everything_after_the_separator_for_the_job():
    args = build_parser().parse_args(["submit", "--address", "http://h:8265", "--no-wait", "--", "train", "seg",
                                      "--data", "d", "--workers", "1-2", "--no-wait"])
    assert args.address == "http://h:8265" and args.no_wait
    # the job's flags stay the job's, even one that submit also has
    assert args.command_args[-3:] == ["--workers", "1-2", "--no-wait"]
    args = build_parser().parse_args(["submit", "--", "train", "seg", "--data", "d", "--workers", "1-2"])
    assert submit.check_forwarded(args.command_args) == ["train", "seg", "--data", "d", "--workers", "1-2"]


def test_job_environment_carries_workdir_tracking_and_extras():
    env = submit.job_env("/shared/runs", "http://mlflow:5000", ["GENSEG_NUM_CPUS=8", "A=b=c"])
    assert env["GENSEG_WORKDIR"] == "/shared/runs" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["GENSEG_NUM_CPUS"] == "8" and env["A"] == "b=c" and env["PYTHONUNBUFFERED"] == "1"
    with pytest.raises(submit.JobError, match="NAME=VALUE"):
        submit.job_env(None, None, ["novalue"])


def test_dashboard_address_defaults_and_refusals(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.address_of(None) == "http://127.0.0.1:8265"
    assert submit.address_of("10.0.0.5:8265") == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")          # a GCS address is not the dashboard
    assert submit.address_of(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265/")
    assert submit.address_of(None) == "http://head:8265"
    with pytest.raises(submit.JobError, match="dashboard"):
        submit.address_of("ray://head:10001")


def test_token_comes_from_the_environment_or_the_token_file(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    with pytest.raises(submit.JobError, match="RAY_AUTH_TOKEN_PATH"):
        submit._token()
    (tmp_path / "tok").write_text("abc123\n")
    assert submit._token() == "abc123"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert submit._token() == "fromenv"


def _genseg(*argv, timeout=60):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    return r, time.monotonic() - t0


def test_an_unreachable_cluster_is_one_line_and_nothing_is_submitted():
    port = free_port(preferred=0)
    r, took = _genseg("submit", "--address", f"http://127.0.0.1:{port}", "--", "prepare", "--source", "synthetic",
                      "--out", "/tmp/never")
    assert r.returncode == 1 and took < 30
    assert r.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    r, _ = _genseg("jobs", "list", "--address", f"http://127.0.0.1:{port}")
    assert r.returncode == 1 and f"127.0.0.1:{port}" in r.stderr


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b"OK"

    def do_GET(self):
        if self.path == "/health" and self.body is not None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(self.body)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def http_server():
    servers = []

    def start(body):
        handler = type("H", (_Handler,), {"body": body})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"
    yield start
    for s in servers:
        s.shutdown()


def test_tracking_server_check(http_server):
    from genseg.tracking import TrackingServerError, check_server

    check_server(http_server(b"OK"))                      # an MLflow server's /health
    check_server("sqlite:///nowhere/mlflow.db")           # not a server: nothing to check
    with pytest.raises(TrackingServerError, match="is it an MLflow server"):
        check_server(http_server(None))                   # something else that answers HTTP
    port = free_port(preferred=0)
    with pytest.raises(TrackingServerError, match=f"cannot reach the MLflow tracking server http://127.0.0.1:{port}"):
        check_server(f"http://127.0.0.1:{port}")


def test_a_wrong_tracking_uri_ends_a_command_in_seconds_with_one_line(tmp_path):
    port = free_port(preferred=0)
    uri = f"http://127.0.0.1:{port}"
    r, took = _genseg("train", "seg", "--data", str(tmp_path), "--tracking-uri", uri, "--workdir", str(tmp_path))
    assert r.returncode == 1 and took < 15, (took, r.stderr)
    assert uri in r.stderr and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_workers_takes_a_count_or_an_elastic_range():
    import argparse

    assert _workers("2") == 2 and _workers("1-4") == (1, 4) and _workers("3-3") == 3
    for bad in ("0", "4-1", "x", "1-", "-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            _workers(bad)
    assert describe_workers((1, 4)) == "1-4" and describe_workers(2) == "2"
    # an elastic run is checked against its largest group: the smallest share per worker
    assert steps_per_epoch(40, (1, 4), 5) == 2 == steps_per_epoch(40, 4, 5)
