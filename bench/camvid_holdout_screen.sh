#!/usr/bin/env bash
# Issue 14's recipe screen on 2 CPU cores: three `genseg tune seg` grids on CamVid with the holdout
# sequence as the objective (bench/configs/camvid_screen_cpu.yaml: compact FCN-8s at half
# resolution, 20 epochs, two one-thread trials at a time), then the winner's test-time augmentation.
#   bash bench/camvid_holdout_screen.sh CAMVID_ROOT [WORKDIR]
# About 90 minutes on 2 cores.  Results: bench/results/tune_holdout_*.json, tta_holdout_*.json.
set -euo pipefail
ROOT=${1:?usage: camvid_holdout_screen.sh CAMVID_ROOT [WORKDIR]}
WD=${2:-bench/runs/camvid-holdout}
G=${GENSEG:-.venv/bin/genseg}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
SHARDS=$WD/shards
[ -f "$SHARDS/manifest.json" ] || $G prepare --source camvid --root "$ROOT" --splits train,val --out "$SHARDS" \
    --workdir "$WD" --holdout 0006R0
for space in weights_loss:tune_seg_holdout schedule_seed:tune_seg_holdout_schedule sgd:tune_seg_holdout_sgd; do
  tag=${space%%:*}; file=${space#*:}
  $G tune seg --data "$SHARDS" --config bench/configs/camvid_screen_cpu.yaml --class-weights inv-sqrt \
      --space "bench/configs/$file.yaml" --max-concurrent 2 --grace-epochs 20 --name "screen-$tag" \
      --workdir "$WD" --json "bench/results/tune_holdout_$tag.json"
done
# test-time augmentation on the champion (the best trial of the searches): plain, flip, scales, both
M=models:/genseg-segmenter@champion
for tta in plain flip scales flip_scales; do
  extra=()
  case $tta in flip) extra=(--tta-flip);; scales) extra=(--tta-scales 0.75,1,1.25);;
               flip_scales) extra=(--tta-flip --tta-scales 0.75,1,1.25);; esac
  $G eval seg --model $M --data "$SHARDS" --split holdout --workdir "$WD" "${extra[@]}" \
      --json "bench/results/tta_holdout_$tta.json"
done
# photometric augmentation on top (jitter, gamma, blur) at three seeds (after the TTA runs, which
# score the champion of the first three searches), against the base's three seeds above
$G tune seg --data "$SHARDS" --config bench/configs/camvid_screen_cpu.yaml --class-weights inv-sqrt \
    --set jitter=0.3 --set gamma=0.3 --set blur=0.2 --space bench/configs/tune_seg_holdout_seeds.yaml \
    --max-concurrent 2 --grace-epochs 20 --name screen-photometric --workdir "$WD" \
    --json bench/results/tune_holdout_photometric.json
