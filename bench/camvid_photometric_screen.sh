#!/usr/bin/env bash
# Photometric augmentation on the 2-core holdout screen, at more seeds and one stronger setting
# (bench/README.md, issue 14): after bench/camvid_holdout_screen.sh, whose base and photometric
# searches ran seeds 0-2.  Three `genseg tune seg` searches of three trials each, ~50 min on 2 cores:
#   * the base recipe at seeds 3-5;
#   * photometric (jitter 0.3, gamma 0.3, blur 0.2) at seeds 3-5, paired with the base by seed;
#   * stronger photometric (jitter 0.5, gamma 0.5, blur 0.4) at seeds 0-2.
#   bash bench/camvid_photometric_screen.sh CAMVID_ROOT [WORKDIR]
# Results: bench/results/tune_holdout_{base_seeds345,photometric_seeds345,photometric_strong}.json
set -euo pipefail
ROOT=${1:?usage: camvid_photometric_screen.sh CAMVID_ROOT [WORKDIR]}
WD=${2:-bench/runs/camvid-holdout}
G=${GENSEG:-.venv/bin/genseg}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
SHARDS=$WD/shards
[ -f "$SHARDS/manifest.json" ] || $G prepare --source camvid --root "$ROOT" --splits train,val --out "$SHARDS" \
    --workdir "$WD" --holdout 0006R0
search() {   # search NAME SPACE [--set ...]
  local name=$1 space=$2; shift 2
  $G tune seg --data "$SHARDS" --config bench/configs/camvid_screen_cpu.yaml --class-weights inv-sqrt \
      --space "bench/configs/$space.yaml" --max-concurrent 2 --grace-epochs 20 --name "screen-$name" \
      --workdir "$WD" --json "bench/results/tune_holdout_$name.json" "$@"
}
search base_seeds345 tune_seg_holdout_seeds345
search photometric_seeds345 tune_seg_holdout_seeds345 --set jitter=0.3 --set gamma=0.3 --set blur=0.2
search photometric_strong tune_seg_holdout_seeds --set jitter=0.5 --set gamma=0.5 --set blur=0.4
