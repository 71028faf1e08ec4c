#!/usr/bin/env bash
# Issue 14's recipe screen on 2 CPU cores: `genseg tune seg` grids on CamVid with the holdout
# sequence as the objective (bench/configs/camvid_screen_cpu.yaml: compact FCN-8s at half
# resolution, 20 epochs, two one-thread trials at a time), the winner's test-time augmentation, and
# photometric augmentation, a wider scale range, twice the epochs and twice the width against the
# base recipe, paired by seed, photometric augmentation on top of twice the epochs, and instance
# normalisation in the early layers (IBN-Net), and mixing two training images (CutMix, ClassMix).
#   bash bench/camvid_holdout_screen.sh CAMVID_ROOT [WORKDIR]
# About 670 minutes on 2 cores (the paired-seed searches at the end, about 600 of them).
# Results: bench/results/tune_holdout_*.json, tta_holdout_*.json.
set -euo pipefail
ROOT=${1:?usage: camvid_holdout_screen.sh CAMVID_ROOT [WORKDIR]}
WD=${2:-bench/runs/camvid-holdout}
G=${GENSEG:-.venv/bin/genseg}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
SHARDS=$WD/shards
[ -f "$SHARDS/manifest.json" ] || $G prepare --source camvid --root "$ROOT" --splits train,val --out "$SHARDS" \
    --workdir "$WD" --holdout 0006R0
# search NAME SPACE [--set ...]: one grid over bench/configs/SPACE.yaml on the screen's base recipe, its
# summary in bench/results/tune_holdout_NAME.json.  The search is named screen-NAME, or SEARCH_NAME
# where given: the names the searches of bench/README.md ran under, so that rerunning this script into
# their workdir finds each one finished instead of searching again
search() {
  local name=$1 space=$2; shift 2
  $G tune seg --data "$SHARDS" --config bench/configs/camvid_screen_cpu.yaml --class-weights inv-sqrt \
      --space "bench/configs/$space.yaml" --max-concurrent 2 --grace-epochs 20 --name "${SEARCH_NAME:-screen-$name}" \
      --workdir "$WD" --json "bench/results/tune_holdout_$name.json" "$@"
}
SEARCH_NAME=screen-weights-loss search weights_loss tune_seg_holdout
search schedule_seed tune_seg_holdout_schedule
search sgd tune_seg_holdout_sgd
# test-time augmentation on the champion (the best trial of the searches): plain, flip, scales, both
M=models:/genseg-segmenter@champion
for tta in plain flip scales flip_scales; do
  extra=()
  case $tta in flip) extra=(--tta-flip);; scales) extra=(--tta-scales 0.75,1,1.25);;
               flip_scales) extra=(--tta-flip --tta-scales 0.75,1,1.25);; esac
  $G eval seg --model $M --data "$SHARDS" --split holdout --workdir "$WD" "${extra[@]}" \
      --json "bench/results/tta_holdout_$tta.json"
done
# photometric augmentation (jitter, gamma, blur) against the base recipe, paired by seed: the base's
# seeds 0-2 are trials of the first two searches; then a stronger setting at seeds 0-2
PHOTO=(--set jitter=0.3 --set gamma=0.3 --set blur=0.2)
search photometric tune_seg_holdout_seeds "${PHOTO[@]}"
search base_seeds345 tune_seg_holdout_seeds345
search photometric_seeds345 tune_seg_holdout_seeds345 "${PHOTO[@]}"
search photometric_strong tune_seg_holdout_seeds --set jitter=0.5 --set gamma=0.5 --set blur=0.4
# the scale range of the GPU recipe (0.5-2 at full resolution, 0.25-1.0 at the screen's half) at seeds 0-2
search scale_wide tune_seg_holdout_seeds --set scale_min=0.25 --set scale_max=1.0
# training length: 40 epochs instead of 20 (the poly schedule stretched to match) at seeds 0-2
search epochs40 tune_seg_holdout_seeds --epochs 40 --grace-epochs 40
# width: the compact backbone at width 64 instead of 32, at seeds 0-3 (two rounds of two trials)
SEARCH_NAME=screen-w64 search width64 tune_seg_holdout_seeds0123 --set width=64
# photometric augmentation on top of 40 epochs, at seeds 0-3, paired with the 40-epoch arm
SEARCH_NAME=screen-epochs40-photometric \
  search epochs40_photometric tune_seg_holdout_seeds0123 --epochs 40 \
    --grace-epochs 40 "${PHOTO[@]}"
# all three (width 64, 40 epochs, photometric) at seeds 0-1, with a champion margin of one seed sd
SEARCH_NAME=screen-width64-epochs40-photometric \
  search width64_epochs40_photometric tune_seg_holdout_seeds01 --epochs 40 \
    --grace-epochs 40 --set width=64 \
    "${PHOTO[@]}" --champion-margin 0.015
SEARCH_NAME=screen-width64-epochs40-photometric-s23 \
  search width64_epochs40_photometric_seeds23 tune_seg_holdout_seeds23 \
    --epochs 40 --grace-epochs 40 --set width=64 \
    "${PHOTO[@]}" --champion-margin 0.015
# 80 epochs with photometric augmentation at seeds 0-3, paired with the 40-epoch photometric arm
SEARCH_NAME=screen-epochs80-photometric \
  search epochs80_photometric tune_seg_holdout_seeds01 --epochs 80 --grace-epochs 80 \
    "${PHOTO[@]}" --champion-margin 0.015
SEARCH_NAME=screen-epochs80-photometric-s23 \
  search epochs80_photometric_seeds23 tune_seg_holdout_seeds23 --epochs 80 \
    --grace-epochs 80 "${PHOTO[@]}" \
    --champion-margin 0.015
# instance normalisation in the early layers (IBN-Net, --set norm=...) on the base recipe at seeds 0-3,
# then IBN-b on top of 40 epochs + photometric at seeds 0-3, paired with that arm
search ibn_b tune_seg_holdout_seeds0123 --set norm=ibn_b --champion-margin 0.015
search ibn_a tune_seg_holdout_seeds0123 --set norm=ibn_a --champion-margin 0.015
SEARCH_NAME=screen-epochs40-photometric-ibn_b \
  search epochs40_photometric_ibn_b tune_seg_holdout_seeds0123 --epochs 40 \
    --grace-epochs 40 "${PHOTO[@]}" \
    --set norm=ibn_b --champion-margin 0.015
# IBN-b at 40 epochs without photometric augmentation, seeds 0-1 then 2-3, paired with the 40-epoch arm
SEARCH_NAME=screen-epochs40-ibn_b \
  search epochs40_ibn_b tune_seg_holdout_seeds01 --epochs 40 --grace-epochs 40 \
    --set norm=ibn_b --champion-margin 0.015
SEARCH_NAME=screen-epochs40_ibn_b_s23 \
  search epochs40_ibn_b_seeds23 tune_seg_holdout_seeds23 --epochs 40 --grace-epochs 40 \
    --set norm=ibn_b --champion-margin 0.015
# ... and the 40-epoch arm's fourth seed (it ran at seeds 0-2), to pair with both
search epochs40_seed3 tune_seg_holdout_seed3 --epochs 40 --grace-epochs 40 --champion-margin 0.015
# IBN-b in place of photometric augmentation in the best arm (width 64, 40 epochs), seeds 0-1
search width64_epochs40_ibn_b tune_seg_holdout_seeds01 --epochs 40 --grace-epochs 40 --set width=64 \
    --set norm=ibn_b --champion-margin 0.015
SEARCH_NAME=screen-width64-epochs40-ibn_b-s23 \
  search width64_epochs40_ibn_b_seeds23 tune_seg_holdout_seeds23 --epochs 40 --grace-epochs 40 \
    --set width=64 --set norm=ibn_b --champion-margin 0.015
# mixing two training images (--set mix=...: CutMix's box, ClassMix's half of the classes), each
# sample with probability 0.5, on the base recipe at seeds 0-3, paired with the base
search classmix tune_seg_holdout_seeds0123 --set mix=classmix --champion-margin 0.015
search cutmix tune_seg_holdout_seeds0123 --set mix=cutmix --champion-margin 0.015
# the base's seeds 0-1 once more: on another machine or in another session, how far the pairing with
# the base rows above can be trusted (bench/README.md: a rerun gave -0.2 and +0.5 on the holdout)
SEARCH_NAME=screen-base-rerun01 search base_rerun01 tune_seg_holdout_seeds01 --champion-margin 0.015
# CutMix at 40 epochs, seeds 0-1, paired with the 40-epoch arm and the 40-epoch photometric arm
SEARCH_NAME=screen-epochs40-cutmix search epochs40_cutmix tune_seg_holdout_seeds01 --epochs 40 --grace-epochs 40 \
    --set mix=cutmix --champion-margin 0.015
