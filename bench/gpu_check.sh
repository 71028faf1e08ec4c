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
check_resumed() {   # check_resumed NAME: NAME-dev ran 2 epochs, NAME-dev-resumed resumed it for a third
    [[ "$(json "$WORK/$1-dev.json" 'd["final_epoch"]')" == 1 ]] || { echo "gpu_check: $1-dev.json: unexpected final_epoch" >&2; exit 1; }
    [[ "$(json "$WORK/$1-dev-resumed.json" 'd["final_epoch"]')" == 2 ]] || { echo "gpu_check: $1-dev-resumed.json: unexpected final_epoch" >&2; exit 1; }
    [[ "$(json "$WORK/$1-dev-resumed.json" 'd["resumed"]')" == True ]] || { echo "gpu_check: $1 did not resume" >&2; exit 1; }
}
if want seg; then
    genseg "seg $DEVICE bf16" "${SEG[@]}" "${GPU[@]}" --epochs 2 --set amp=bf16 --run-name seg-dev \
        --json "$WORK/seg-dev.json"
    genseg "seg $DEVICE fp16, resumed" "${SEG[@]}" "${GPU[@]}" --epochs 3 --set amp=fp16 --run-name seg-dev \
        --json "$WORK/seg-dev-resumed.json"
    want cpu && genseg "seg cpu" "${SEG[@]}" --epochs 2 --run-name seg-cpu --json "$WORK/seg-cpu.json"
    check_resumed seg
    SEG_CKPT="$(json "$WORK/seg-dev-resumed.json" 'd["best_checkpoint"]')"
    genseg "eval seg $DEVICE" eval seg --model "$SEG_CKPT" --data "$DATA" --device "$DEVICE" --json "$WORK/eval-dev.json"
fi
if want diffusion; then
    genseg "diffusion $DEVICE fp16" "${DIF[@]}" "${GPU[@]}" --epochs 2 --set amp=fp16 --run-name dif-dev \
        --json "$WORK/dif-dev.json"
    genseg "diffusion $DEVICE bf16, resumed" "${DIF[@]}" "${GPU[@]}" --epochs 3 --set amp=bf16 --run-name dif-dev \
        --json "$WORK/dif-dev-resumed.json"
    want cpu && genseg "diffusion cpu" "${DIF[@]}" --epochs 2 --run-name dif-cpu --json "$WORK/dif-cpu.json"
    check_resumed dif
    DIF_CKPT="$(json "$WORK/dif-dev-resumed.json" 'd["best_checkpoint"]')"
    SAMPLE=(sample --model "$DIF_CKPT" --num 16 --batch-size 8 --masks "$DATA" --sampler ddim --steps 20)
    genseg "sample ddim x20 $DEVICE" "${SAMPLE[@]}" --device "$DEVICE" --out "$WORK/samples-dev"
    want cpu && genseg "sample ddim x20 cpu" "${SAMPLE[@]}" --device cpu --out "$WORK/samples-cpu"
fi
if want gan; then
    genseg "gan $DEVICE bf16 wgan-gp" "${GAN[@]}" "${GPU[@]}" --epochs 2 --set amp=bf16 --run-name gan-dev \
        --json "$WORK/gan-dev.json"
    genseg "gan $DEVICE fp32, resumed" "${GAN[@]}" "${GPU[@]}" --epochs 3 --set amp=none --run-name gan-dev \
        --json "$WORK/gan-dev-resumed.json"
    want cpu && genseg "gan cpu" "${GAN[@]}" --epochs 2 --run-name gan-cpu --json "$WORK/gan-cpu.json"
    check_resumed gan
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
