"""The Serve application: ``build_app(args)`` binds the deployments into one app.

    serve run serve_app.app:build_app segmenter=models:/genseg-segmenter@champion
    serve run serve_app/config.yaml          # the same, with autoscaling and limits spelled out
    genseg serve                             # starts Ray and Serve, binds 127.0.0.1:8000

``args`` are :class:`serve_app.options.AppOptions` fields.  The model REFs are resolved by each
replica (registry aliases are followed as they move, every ``poll_interval_s``).
"""
from __future__ import annotations

from serve_app.api import Api
from serve_app.deployments import EditorDeployment, GeneratorDeployment, SegmenterDeployment
from serve_app.options import AppOptions

DEPLOYMENTS = {"Segmenter": SegmenterDeployment, "Generator": GeneratorDeployment, "Editor": EditorDeployment,
               "Api": Api}


def build_app(args: dict | None = None):
    """The application builder of ``serve run`` / ``serve deploy`` (one parameter: the config's
    ``args``, :class:`AppOptions` fields)."""
    return compose(args)


def compose(args: dict | None = None, deployment_options: dict[str, dict] | None = None):
    """The bound application (``args``: :class:`AppOptions` fields).  Deployment options, including
    each model deployment's ``user_config`` (``{"model": REF, "poll_interval_s": S}``, and
    ``max_batch_size`` for the segmenter), come from serve_app/config.yaml; deploying it again with
    only a user_config changed reaches the running replicas' ``reconfigure``: no restart.
    From Python, ``deployment_options`` (``{"Segmenter": {"autoscaling_config": {...}}}``) does the same."""
    opts = AppOptions.from_dict(args).resolved()
    extra = dict(deployment_options or {})
    unknown = sorted(set(extra) - set(DEPLOYMENTS))
    if unknown:
        raise ValueError(f"unknown deployment(s) {', '.join(unknown)}; the app has {', '.join(DEPLOYMENTS)}")
    d = {name: dep.options(**extra[name]) if name in extra else dep for name, dep in DEPLOYMENTS.items()}
    seg = d["Segmenter"].bind(opts.segmenter, opts.tracking_uri, opts.threads, opts.poll_interval_s,
                              opts.max_batch_size, opts.batch_wait_timeout_s)
    gen = d["Generator"].bind(opts.generator, opts.tracking_uri, opts.threads, opts.poll_interval_s)
    editor = d["Editor"].bind(seg, gen)
    return d["Api"].bind(seg, gen, editor, opts.to_dict())
