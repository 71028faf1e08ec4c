"""``genseg serve``: check the models, start (or join) Ray, run the app on Serve, block until Ctrl-C or
SIGTERM, then take down what this command started: the app, Serve and, for a local Ray, Ray itself.
"""
from __future__ import annotations

import logging
import socket
import sys
import tempfile
import time

from genseg.errors import InputError
from serve_app.options import AppOptions

APP_NAME = "genseg"


class ServeError(InputError):
    """The address cannot be served on, or a model REF does not load."""


def check_port(host: str, port: int) -> None:
    """One line, before Ray starts, when the address is taken or not ours to bind."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        why = "is in use (another genseg serve?)" if exc.errno == 98 else f"cannot be bound ({exc.strerror or exc})"
        raise ServeError(f"{host}:{port} {why}; pick another with --port") from None


def check_models(opts: AppOptions) -> dict:
    """Resolve and load both REFs once in this process, so a missing or wrong model is one line
    here instead of a replica that fails to start."""
    from genseg import tracking
    from genseg.loading import load

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for role, ref, expect in (("segmenter", opts.segmenter, "segmenter"),
                                  ("generator", opts.generator, "generator")):
            resolved = tracking.resolve(ref, opts.tracking_uri, dst=f"{tmp}/{role}")
            model = load(resolved, expect=expect)
            out[role] = (resolved.describe(), model)
    seg, gen = out["segmenter"][1], out["generator"][1]
    if gen.conditional and gen.num_classes != seg.num_classes:
        raise ServeError(f"the generator ({out['generator'][0]}) knows {gen.num_classes} classes and the segmenter "
                         f"({out['segmenter'][0]}) {seg.num_classes}: serve two models of one label set")
    return {role: desc for role, (desc, _) in out.items()}


def free_port(host: str = "127.0.0.1", preferred: int = 8000) -> int:
    """``preferred`` when it is free, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ServeError(f"no free TCP port on {host}")


def run(rt, opts: AppOptions, host: str = "127.0.0.1", port: int = 8000, detach: bool = False,
        on_ready=None, block: bool = True) -> int:
    """Serve until interrupted (or, with ``detach`` on a cluster, deploy and return).  ``on_ready(url)``
    runs once the app answers; with ``block=False`` the app is stopped right after it."""
    import ray
    from ray import serve

    from jobs.runtime import init_ray
    from serve_app.app import build_app

    opts = AppOptions(**{**opts.to_dict(), "workdir": str(rt.workdir), "tracking_uri": rt.tracking_uri})
    local = not rt.ray_address or rt.ray_address == "local"
    if detach and local:
        raise ServeError("--detach needs --ray-address: a local Ray ends with this command")
    if local:
        check_port(host, port)
    described = check_models(opts)
    if not rt.verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    started = time.monotonic()
    init_ray(rt)
    try:
        timeout = max(opts.segment_timeout_s, opts.generate_timeout_s) + 30   # Serve's own backstop
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": timeout})
        print(f"starting {APP_NAME} on Serve: segmenter {described['segmenter']}, generator "
              f"{described['generator']}", flush=True)
        serve.run(build_app(opts.to_dict()), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        print(f"serving at {url} (API docs {url}docs) after {time.monotonic() - started:.0f} s; "
              + ("deployed, leaving it running" if detach else "Ctrl-C to stop"), flush=True)
        if on_ready is not None:
            on_ready(url)
        if detach or not block:
            return 0
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr, flush=True)
        return 0
    finally:
        if not detach:
            _stop(local)


def _stop(local: bool) -> None:
    import ray
    from ray import serve

    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception as exc:   # the cluster went away first: nothing left to stop there
        print(f"genseg serve: while stopping Serve: {str(exc).splitlines()[0] if str(exc) else exc!r}",
              file=sys.stderr)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print("stopped", file=sys.stderr, flush=True)
