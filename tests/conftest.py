"""Shared fixtures.  Tests never read ../shared: they make their own small data."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (logical CPUs > cores, ray-notes.md)."""
    import ray

    from jobs.runtime import Runtime, init_ray

    init_ray(Runtime(workdir=None, tracking_uri="", ray_address=None), num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _isolated_tracking(monkeypatch):
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; keep one test's store out of the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield
