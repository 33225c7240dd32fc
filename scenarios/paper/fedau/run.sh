#!/usr/bin/env bash
# FedAU vs its baselines under Bernoulli, Markov and cyclic participation (ALGORITHMS.md §2.7).
# Usage: bash scenarios/paper/fedau/run.sh [OUT_DIR [--set KEY=VALUE ...]]
#        (default OUT_DIR /tmp/runs_fedau; extra --set flags go to every run; ~5 min on 2 cores)
# Then:  fedsim compare OUT_DIR/*-<pattern>-*; fedsim plot ... -o docs/figures/fedau_<pattern>.png
set -euo pipefail
OUT=${1:-/tmp/runs_fedau}
shift $(( $# > 0 ? 1 : 0 ))
EXTRA=("$@")
HERE=$(dirname "$0")
FEDSIM=${FEDSIM:-fedsim}
for pattern in bernoulli markov cyclic; do
  run() {  # run NAME [--set KEY=VALUE ...]
    local name=$1; shift
    "$FEDSIM" run "$HERE/$pattern.yaml" --quiet --out "$OUT" --set "name=$name-$pattern" "$@" ${EXTRA[@]+"${EXTRA[@]}"}
  }
  run fedau                                                     # K = inf, eta = 1
  run fedau-k50  --set strategy.cutoff=50                       # interval cutoff K = 50
  run known-prob --set strategy.name=known-prob                 # oracle 1/p_n
  run fedavg     --set strategy.name=fedavg --set strategy.weighting=uniform  # mean over S
  run fedavg-all --set strategy.name=fedavg-all --set strategy.server_lr=10   # reference README: eta = 10
  run fedvarp    --set strategy.name=fedvarp                    # O(N d) server memory
  run mifa       --set strategy.name=mifa                       # O(N d) server memory
done
