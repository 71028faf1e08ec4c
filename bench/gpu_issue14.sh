#!/usr/bin/env bash
# Issue 14 on one GPU, as one prepared command for a lent machine where Ray and MLflow are not
# installed (bench/gpu_check.sh needs them): genseg's training steps and samplers on the device
# (bench/gpu_models.py), then CamVid recipes side by side on one GPU (bench/gpu_seg.py), each scored
# on val (0016E5) and on the holdout sequence 0006R0.
#
#   bash bench/gpu_issue14.sh CAMVID_ROOT OUTDIR [MINUTES]
#
# CAMVID_ROOT may hold JPEG copies of the images (what fits a 64 MiB transfer); labels stay PNG.
# Extra wheels (e.g. diffusers) in .gpu/whl are installed to /tmp/site first when present.
set -uo pipefail
ROOT="${1:?CamVid root}"; OUTDIR="${2:?output dir}"; MIN="${3:-4.5}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
[[ -n "${GPU14_SKIP_MODELS:-}" ]] || timeout 150 "$PY" bench/gpu_models.py --json "$OUTDIR/gpu_models.json" 2>&1 | tee "$OUTDIR/gpu_models.log"

C=bench/configs/camvid_fcn8s.yaml
CPU=(--config "$C" --set epochs=40 --set batch_size=8 --eval-every 2 --minutes "$MIN")
PHOTO=(--set jitter=0.3 --set gamma=0.3 --set blur=0.2)
# GPU14_EXTRA: more gpu_seg.py arguments for every run (a CPU dry run: "--limit 4 --set crop=64x96 --device cpu")
read -r -a EXTRA <<<"${GPU14_EXTRA:-}"
run() { local tag=$1; shift; timeout 540 "$PY" bench/gpu_seg.py --root "$ROOT" --holdout 0006R0 --out "$OUTDIR" --tag "$tag" "$@" \
            ${EXTRA[@]+"${EXTRA[@]}"} >"$OUTDIR/$tag.log" 2>&1 & }
run gpu-resnet34 --config bench/configs/camvid_gpu.yaml --class-weights inv-sqrt --eval-every 10 --minutes "$MIN"
run c40-compact-dataset-photo "${CPU[@]}" --class-weights dataset "${PHOTO[@]}"
run c40-compact-invsqrt-photo "${CPU[@]}" --class-weights inv-sqrt "${PHOTO[@]}"
run c40-resnet18-invsqrt "${CPU[@]}" --set backbone=resnet18 --class-weights inv-sqrt
run c40-resnet18-invsqrt-photo "${CPU[@]}" --set backbone=resnet18 --class-weights inv-sqrt "${PHOTO[@]}"
run c40-resnet18-invsqrt-photo-cedice "${CPU[@]}" --set backbone=resnet18 --class-weights inv-sqrt "${PHOTO[@]}" --set loss=ce_dice
run c40-compact-invsqrt-holdout1TP "${CPU[@]}" --class-weights inv-sqrt --holdout 0001TP
if [[ -z "${GPU14_SECOND:-}" ]]; then     # the two that ran in the first call (they do not need a rerun)
    run c40-compact-dataset "${CPU[@]}" --class-weights dataset
    run c40-compact-invsqrt "${CPU[@]}" --class-weights inv-sqrt
fi
wait
for f in "$OUTDIR"/*.log; do echo "== $f"; grep -E "done:|Error|error|fit in" "$f" | tail -n 3; done
