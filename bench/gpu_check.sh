#!/usr/bin/env bash
# GPU check: the --gpu paths end to end on one GPU, and how much faster they are than the CPU.
#
#   bash bench/gpu_check.sh                                 # on a machine with a CUDA GPU (~5 min)
#   GENSEG_GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh     # the same script on the CPU (a dry run)
#   GENSEG_PYTHON=python3 bash bench/gpu_check.sh           # with another interpreter than .venv's
#
# In a temporary workdir it prepares small synthetic shards, then:
#   * trains segmentation with --gpu and AMP bf16 (1 worker), resumes it one epoch with fp16
#     (GradScaler, restored optimizer/scaler/RNG state on the GPU), and a 2-epoch CPU run;
#   * trains diffusion with --gpu and AMP fp16 (unscale -> clip, EMA on the GPU, sample grids),
#     resumes it one epoch with bf16, and a 2-epoch CPU run;
#   * trains a WGAN-GP GAN with --gpu and bf16 (both networks and optimizers, the penalty's double
#     backward on the device), resumes it one epoch in fp32, a 2-epoch CPU run, and samples it;
#   * samples with DDIM x20 on the device and on the CPU (genseg sample --device);
#   * evaluates the segmenter on the device (genseg eval seg --device);
# and prints training img/s and DDIM s/image for the device next to the CPU.
# Env: GENSEG_GPU_CHECK_NUM (synthetic scenes, default 256), GENSEG_GPU_CHECK_SIZE (HxW, default
# 64x64), GENSEG_GPU_CHECK_KEEP=1 keeps the workdir, GENSEG_GPU_CHECK_SKIP leaves parts out (a
# comma-separated list of seg, diffusion, gan and cpu, e.g. "seg,cpu" to rerun the rest on the device).  On failure the workdir and logs are kept.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${GENSEG_PYTHON:-$ROOT/.venv/bin/python}"
DEVICE="${GENSEG_GPU_CHECK_DEVICE:-cuda}"
NUM="${GENSEG_GPU_CHECK_NUM:-256}"
SIZE="${GENSEG_GPU_CHECK_SIZE:-64x64}"
SKIP=",${GENSEG_GPU_CHECK_SKIP:-},"
want() { [[ "$SKIP" != *",$1,"* ]]; }   # want PART: PART is not in GENSEG_GPU_CHECK_SKIP

if ! command -v "$PY" >/dev/null; then
    echo "gpu_check: no $PY; run 'make install' first (or name an interpreter in GENSEG_PYTHON)" >&2
    exit 1
fi
case "$DEVICE" in
    cuda)
        if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
            echo "gpu_check: torch sees no CUDA device (GENSEG_GPU_CHECK_DEVICE=cpu runs this script on the CPU)" >&2
            exit 1
        fi
        GPU=(--gpu) ;;
    cpu) GPU=() ;;
    *) echo "gpu_check: GENSEG_GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac

WORK="$(mktemp -d "${TMPDIR:-/tmp}/genseg-gpu-check.XXXXXX")"
finish() {
    local code=$?
    if [[ $code -ne 0 ]]; then
        echo "gpu_check: FAILED (exit $code); workdir and logs kept in $WORK" >&2
    elif [[ "${GENSEG_GPU_CHECK_KEEP:-0}" == 1 ]]; then
        echo "workdir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap finish EXIT

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
unset RAY_ADDRESS MLFLOW_TRACKING_URI
cd "$ROOT"
DATA="$WORK/data"
mkdir -p "$WORK/logs"

# genseg <log name> <args...>: one command, its output in logs/<name>.log (shown when it fails)
genseg() {
    local name=$1; shift
    local t0=$SECONDS
    printf '%-34s' "$name"
    if ! "$PY" -m jobs.cli "$@" --workdir "$WORK/runs" >"$WORK/logs/$name.log" 2>&1; then
        echo "FAILED"
        tail -n 40 "$WORK/logs/$name.log" >&2
        return 1
    fi
    echo "ok ($((SECONDS - t0)) s)"
}
json() {   # json FILE EXPR: a value of a JSON file (EXPR indexes d)
    "$PY" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

echo "genseg GPU check: device=$DEVICE, $NUM synthetic scenes at $SIZE, workdir $WORK"
genseg prepare prepare --source synthetic --num "$NUM" --size "$SIZE" --out "$DATA"

SEG=(train seg --data "$DATA" --workers 1 --batch-size 16 --set image_every=100)
DIF=(train diffusion --data "$DATA" --workers 1 --batch-size 16 --set sample_every=1 --set sample_steps=10)
GAN=(train gan --data "$DATA" --workers 1 --batch-size 16 --loss wgan-gp --set d_steps=2 --set sample_every=1)
# trains KEY NAME AMP AMP2 ARGS...: train 2 epochs on the device with AMP (KEY-dev.json), resume the
# same run for a third with AMP2 (KEY-dev-resumed.json), train 2 epochs on the CPU (KEY-cpu.json, the
# warm-epoch reference), and check that the resumed run continued from epoch 2.
trains() {
    local key=$1 name=$2 amp=$3 amp2=$4; shift 4
    genseg "$name $DEVICE $amp" "$@" "${GPU[@]}" --epochs 2 --set amp="$amp" --run-name "$key-dev" \
        --json "$WORK/$key-dev.json"
    genseg "$name $DEVICE $amp2, resumed" "$@" "${GPU[@]}" --epochs 3 --set amp="$amp2" --run-name "$key-dev" \
        --json "$WORK/$key-dev-resumed.json"
    if want cpu; then genseg "$name cpu" "$@" --epochs 2 --run-name "$key-cpu" --json "$WORK/$key-cpu.json"; fi
    [[ "$(json "$WORK/$key-dev.json" 'd["final_epoch"]')" == 1 ]] || { echo "gpu_check: $key-dev.json: unexpected final_epoch" >&2; exit 1; }
    [[ "$(json "$WORK/$key-dev-resumed.json" 'd["final_epoch"]')" == 2 ]] || { echo "gpu_check: $key-dev-resumed.json: unexpected final_epoch" >&2; exit 1; }
    [[ "$(json "$WORK/$key-dev-resumed.json" 'd["resumed"]')" == True ]] || { echo "gpu_check: $name did not resume" >&2; exit 1; }
}
if want seg; then
    trains seg seg bf16 fp16 "${SEG[@]}"
    SEG_CKPT="$(json "$WORK/seg-dev-resumed.json" 'd["best_checkpoint"]')"
    genseg "eval seg $DEVICE" eval seg --model "$SEG_CKPT" --data "$DATA" --device "$DEVICE" --json "$WORK/eval-dev.json"
fi
if want diffusion; then
    trains dif diffusion fp16 bf16 "${DIF[@]}"
    DIF_CKPT="$(json "$WORK/dif-dev-resumed.json" 'd["best_checkpoint"]')"
    SAMPLE=(sample --model "$DIF_CKPT" --num 16 --batch-size 8 --masks "$DATA" --sampler ddim --steps 20)
    genseg "sample ddim x20 $DEVICE" "${SAMPLE[@]}" --device "$DEVICE" --out "$WORK/samples-dev"
    if want cpu; then genseg "sample ddim x20 cpu" "${SAMPLE[@]}" --device cpu --out "$WORK/samples-cpu"; fi
fi
if want gan; then                      # WGAN-GP: the penalty's double backward on the device
    trains gan gan bf16 none "${GAN[@]}"
    GAN_CKPT="$(json "$WORK/gan-dev-resumed.json" 'd["best_checkpoint"]')"
    genseg "sample gan $DEVICE" sample --model "$GAN_CKPT" --num 16 --masks "$DATA" --device "$DEVICE" --out "$WORK/gan-samples"
fi

"$PY" - "$WORK" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path

work, device = Path(sys.argv[1]), sys.argv[2]


def load(name):
    p = work / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def speed(name):
    d = load(name)
    return None if d is None else d["final_metrics"]["samples_per_s"]


def per_image(name):   # `genseg sample --out DIR` writes DIR/samples.json
    d = load(f"{name}/samples")
    return None if d is None else d["seconds_per_image"]


rows = [
    ("seg train img/s, bf16", speed("seg-dev"), speed("seg-cpu"), True),
    ("seg train img/s, fp16 (resumed, cold)", speed("seg-dev-resumed"), None, True),
    ("diffusion train img/s, fp16", speed("dif-dev"), speed("dif-cpu"), True),
    ("diffusion train img/s, bf16 (resumed, cold)", speed("dif-dev-resumed"), None, True),
    ("gan train img/s, bf16, wgan-gp", speed("gan-dev"), speed("gan-cpu"), True),
    ("gan train img/s, fp32 (resumed, cold)", speed("gan-dev-resumed"), None, True),
    ("DDIM x20 s/image", per_image("samples-dev"), per_image("samples-cpu"), False),
]
name = device
if device == "cuda":
    import torch

    name = f"cuda ({torch.cuda.get_device_name(0)})"
num = lambda v: f"{v:>12.3f}" if v is not None else f"{'-':>12}"
print()
print(f"{'':46}{device:>12}{'cpu':>12}{'speed-up':>10}")
for label, dev, cpu, higher in rows:
    if dev is None:
        continue
    up = f"{(dev / cpu) if higher else (cpu / dev):>9.1f}x" if cpu else f"{'-':>10}"
    print(f"{label:46}{num(dev)}{num(cpu)}{up}")
ev = load("eval-dev")
if ev is not None:
    print(f"eval seg on {device}: {ev['images']} images, mIoU {100 * ev['miou']:.2f}, {ev['seconds']:.2f} s")
print(f"device: {name}; the cpu column is a 1-worker CPU run (AMP is CUDA-only)")
print("training img/s is the last epoch of each run: the second of the device and cpu runs (warm), the only")
print("one of a resumed run (cold: the first epoch in a new process reads and decodes the split); s/image")
print("includes the first batch's warm-up")
EOF
