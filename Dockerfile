# genseg on a Ray base image: the image of every pod in deploy/ (RayJob, RayService) and of `ray start`
# on your own machines.  The base image's Ray must equal the pinned one (pyproject.toml: ray 2.60.0).
#
#   docker build -t genseg:0.1.0 .                                    # CPU
#   docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu -t genseg:0.1.0-gpu .   # CUDA nodes
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}

WORKDIR /home/ray/genseg
# dependencies first (a layer that changes only with pyproject.toml); torch/torchvision are the pinned
# ones, from PyPI (the default wheels carry CUDA; CPU-only nodes run them fine)
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir -p genseg jobs pipelines serve_app && touch genseg/__init__.py jobs/__init__.py \
        pipelines/__init__.py serve_app/__init__.py \
    && pip install --no-cache-dir -e . \
    && python -c "import torch, torchvision, ray; assert ray.__version__ == '2.60.0', ray.__version__"
COPY --chown=ray:users genseg ./genseg
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users serve_app ./serve_app
COPY --chown=ray:users bench/configs ./bench/configs
# the code is in place (an editable install): `genseg ...` and `python -m jobs.cli ...` both work, and
# serveConfigV2's import_path serve_app.app:build_app resolves from this directory
ENV RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    PYTHONUNBUFFERED=1
RUN genseg --help >/dev/null
