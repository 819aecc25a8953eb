#!/usr/bin/env bash
# The Omniglot transfer-learning campaign: pretrain Conv-4 once (omniglot/pretrain-conv4), meta-fine-tune
# ProtoNet from it for 1-shot and 5-shot (omniglot/protonet-pretrained-5w{1,5}s; like Snell et al. and
# scripts/reproduce_omniglot.sh, each model is tested at 5 and 20 ways), evaluate everything on the 600 stored
# test episodes, and score the pretrained backbone alone as ProtoNet, Baseline and Baseline++ (Chen et al. 2019).
# Results: results/omniglot-transfer-*.json. Safe to rerun: a finished stage is kept, a cut one is resumed.
#
#   OMP_NUM_THREADS=1 bash scripts/transfer_omniglot.sh
#   OVERRIDES="train.episodes=1500" bash scripts/transfer_omniglot.sh      # key=value for the fine-tuning runs
#   TAG=8ep PRETRAIN_OVERRIDES="pretrain.epochs=8" bash scripts/transfer_omniglot.sh   # a variant beside the default
#   # Snell et al.'s protocol: train+val for the budgets chosen on train, the last checkpoints tested
#   TAG=trainval PRETRAIN_OVERRIDES="pretrain.splits=[train,val]" OVERRIDES="train.splits=[train,val]" \
#     CHECKPOINT=last bash scripts/transfer_omniglot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FSLTOOL=${FSLTOOL:-.venv/bin/fsltool}
OMNIGLOT=${OMNIGLOT:-../shared/data/omniglot}
read -r -a OVERRIDES <<< "${OVERRIDES:-}"
read -r -a PRETRAIN_OVERRIDES <<< "${PRETRAIN_OVERRIDES:-}"
CHECKPOINT=${CHECKPOINT:-best}  # which checkpoint is tested: best (by validation) or last (validation trained on)
TAG=${TAG:+-$TAG}  # a variant's run folders and results files carry it
mkdir -p data results
[ -f data/omniglot.h5 ] || "$FSLTOOL" prepare omniglot "$OMNIGLOT" data/omniglot.h5

stage() {  # COMMAND RECIPE OUTPUT [key=value...]: start the run, resume a cut one, or keep a finished one
  local command=$1 recipe=$2 out=$3 log
  shift 3
  if [ ! -f "$out/checkpoints/last.pt" ]; then
    "$FSLTOOL" "$command" "$recipe" "$@" -q
  elif ! log=$("$FSLTOOL" "$command" "$recipe" "$@" --resume -q 2>&1); then
    grep -q "already" <<< "$log" || { echo "$log" >&2; exit 1; }
  fi
}

PRETRAINED=runs/omniglot/pretrain-conv4$TAG
stage pretrain omniglot/pretrain-conv4 "$PRETRAINED" output="$PRETRAINED" "${PRETRAIN_OVERRIDES[@]}"
for method in protonet baseline baseline++; do
  for shape in 5w1s 5w5s 20w1s 20w5s; do
    "$FSLTOOL" evaluate "$PRETRAINED" --checkpoint "$CHECKPOINT" --method "$method" --shape "$shape" -q \
      --json "results/omniglot-transfer$TAG-pretrained-$method-$shape.json"
  done
done
for shot in 1 5; do
  run="runs/omniglot/protonet-pretrained$TAG-5w${shot}s"
  stage meta-train "omniglot/protonet-pretrained-5w${shot}s" "$run" output="$run" init="$PRETRAINED" "${OVERRIDES[@]}"
  for way in 5 20; do
    "$FSLTOOL" evaluate "$run" --checkpoint "$CHECKPOINT" --shape "${way}w${shot}s" -q \
      --json "results/omniglot-transfer$TAG-protonet-pretrained-5w${shot}s-at-${way}w${shot}s.json"
  done
done
