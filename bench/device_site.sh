#!/usr/bin/env bash
# Pack what `bench/gpu_check.sh` needs beyond a plain PyTorch image (Ray 2.60, MLflow, diffusers and
# their dependencies) for a GPU machine that has Python 3.12 and PyTorch but cannot download, as one
# xz tarball that fits a 64 MiB transfer (about 51 MB).  Built here, where pip can reach the registry.
#
#   bash bench/device_site.sh OUT.tar.xz [PACKAGES_ALREADY_THERE.txt]
#
# On the GPU machine (Python 3.12, x86-64):
#   mkdir -p /tmp/site && tar -xJf OUT.tar.xz -C /tmp/site
#   PYTHONPATH=/tmp/site:$PWD GENSEG_PYTHON=python3 bash bench/gpu_check.sh
#
# Packages the machine already has are left out (a newline- or space-separated list of names; the
# default is the H200 image this ran on, 2026-12-04), and so are Ray's Java jars, RLlib and Ray LLM,
# which genseg never imports.  huggingface_hub is always left to the machine: transformers there
# refuses a 2.x hub, and diffusers imports transformers when it is installed.
set -euo pipefail
OUT="${1:?usage: device_site.sh OUT.tar.xz [PACKAGES_ALREADY_THERE.txt]}"
THERE="${2:-}"
PY="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
PLATFORM=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64)
MLFLOW="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && .venv/bin/python -c 'import mlflow; print(mlflow.__version__)')"
"$PY" -m pip download -q "${PLATFORM[@]}" -d "$TMP/all" "ray[data,train,tune,default]==2.60.0" \
    "mlflow-skinny==$MLFLOW" sqlalchemy alembic "diffusers==0.42.1"
if [[ -n "$THERE" ]]; then
    there="$(cat "$THERE")"
else
    there="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
    charset-normalizer click cloudpickle filelock frozenlist fsspec grpcio h11 hf-xet httpcore httpx idna
    jinja2 markupsafe msgpack multidict numpy packaging pandas pillow prometheus-client propcache protobuf
    psutil pyarrow python-dateutil pyyaml regex requests rich safetensors scipy six tqdm typing-extensions
    urllib3 wrapt yarl zipp"
fi
there="$there huggingface-hub py-spy"
mkdir -p "$TMP/keep"
"$PY" - "$TMP/all" "$TMP/keep" "$there" <<'EOF'
import re, shutil, sys
from pathlib import Path

src, dst, there = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split()
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
skip = {norm(n) for n in there}
for whl in sorted(src.glob("*.whl")):
    if norm(whl.name.split("-")[0]) not in skip:
        shutil.copy(whl, dst / whl.name)
EOF
"$PY" -m pip install -q --no-deps --no-compile --target "$TMP/site" "${PLATFORM[@]}" "$TMP"/keep/*.whl
rm -rf "$TMP/site/ray/jars" "$TMP/site/ray/rllib" "$TMP/site/ray/llm" "$TMP/site/bin"
tar -cf - -C "$TMP/site" . | xz -T2 -6 >"$OUT"
ls -l "$OUT"
