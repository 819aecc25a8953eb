#!/usr/bin/env bash
# The Omniglot transfer-learning campaign: pretrain Conv-4 once (omniglot/pretrain-conv4), meta-fine-tune
# ProtoNet from it for 1-shot and 5-shot (omniglot/protonet-pretrained-5w{1,5}s; like Snell et al. and
# scripts/reproduce_omniglot.sh, each model is tested at 5 and 20 ways), evaluate everything on the 600 stored
# test episodes, and score the pretrained backbone alone as ProtoNet, Baseline and Baseline++ (Chen et al. 2019).
# Results: results/omniglot-transfer-*.json. Safe to rerun: a finished stage is kept, a cut one is resumed.
# METHODS names the meta-fine-tuned methods (default protonet); fomaml, maml, maml++ and protomaml run their
# omniglot/<method>-pretrained-<setting> recipes for each of SETTINGS (default all four), each tested
# non-transductively and with --transductive (their papers' protocol) into results/omniglot-<method>-<setting>-pretrained[-transductive].json,
# with the run's recipe.yaml and metrics.jsonl copied to results/runs/<run>/ as the evidence.
#
#   OMP_NUM_THREADS=1 bash scripts/transfer_omniglot.sh
#   METHODS="fomaml maml" SETTINGS="5w1s 5w5s" bash scripts/transfer_omniglot.sh
#   OVERRIDES="train.episodes=1500" bash scripts/transfer_omniglot.sh      # key=value for the fine-tuning runs
#   ADAPT_STEPS=10 METHODS=fomaml SETTINGS=20w1s bash scripts/transfer_omniglot.sh   # also tested after 10 fine-tuning steps
#   TAG=8ep PRETRAIN_OVERRIDES="pretrain.epochs=8" bash scripts/transfer_omniglot.sh   # a variant beside the default
#   # Snell et al.'s protocol: train+val for the budgets chosen on train, the last checkpoints tested
#   TAG=trainval PRETRAIN_OVERRIDES="pretrain.splits=[train,val]" OVERRIDES="train.splits=[train,val]" \
#     CHECKPOINT=last bash scripts/transfer_omniglot.sh
#   # MAML's code's protocol: a random character split (fsltool prepare omniglot ... data/omniglot-random.h5
#   # --split random), trained on its train+val, tested on its rotated test characters
#   TAG=random-trainval PRETRAIN_OVERRIDES="data=data/omniglot-random.h5 pretrain.splits=[train,val]" \
#     OVERRIDES="data=data/omniglot-random.h5 train.splits=[train,val]" CHECKPOINT=last METHODS=maml \
#     bash scripts/transfer_omniglot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FSLTOOL=${FSLTOOL:-.venv/bin/fsltool}
OMNIGLOT=${OMNIGLOT:-../shared/data/omniglot}
read -r -a OVERRIDES <<< "${OVERRIDES:-}"
read -r -a PRETRAIN_OVERRIDES <<< "${PRETRAIN_OVERRIDES:-}"
read -r -a METHODS <<< "${METHODS:-protonet}"
read -r -a SETTINGS <<< "${SETTINGS:-5w1s 5w5s 20w1s 20w5s}"
for method in "${METHODS[@]}"; do
  case $method in
    protonet|fomaml|maml|maml++|protomaml) ;;
    *) echo "transfer_omniglot.sh: METHODS may name protonet, fomaml, maml, maml++ and protomaml, got $method" >&2; exit 2 ;;
  esac
done
CHECKPOINT=${CHECKPOINT:-best}  # which checkpoint is tested: best (by validation) or last (validation trained on)
ADAPT_STEPS=${ADAPT_STEPS:-}  # MAML-family runs: also test after this many fine-tuning steps (evaluate --adapt-steps)
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
protonet() {  # the backbone alone under three classifiers, then ProtoNet meta-fine-tuned, each model at 5 and 20 ways
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
}

adapting() {  # METHOD: MAML, first-order MAML, MAML++ or Proto-MAML meta-fine-tuned for each setting, tested under both BatchNorm protocols
  local method=$1 setting run
  for setting in "${SETTINGS[@]}"; do
    run="runs/omniglot/$method-$setting-pretrained$TAG"
    stage meta-train "omniglot/$method-pretrained-$setting" "$run" output="$run" init="$PRETRAINED" "${OVERRIDES[@]}"
    "$FSLTOOL" evaluate "$run" --checkpoint "$CHECKPOINT" -q --json "results/omniglot-$method-$setting-pretrained$TAG.json"
    "$FSLTOOL" evaluate "$run" --checkpoint "$CHECKPOINT" --transductive -q \
      --json "results/omniglot-$method-$setting-pretrained$TAG-transductive.json"
    if [ "$method" = maml++ ]; then  # its paper's protocol: the mean logits of the 5 best-validated checkpoints, transductive,
      "$FSLTOOL" evaluate "$run" --ensemble 5 --transductive -q \
        --json "results/omniglot-$method-$setting-pretrained$TAG-ensemble-transductive.json"
      # and as its code tests: one query per class (the batch statistics of one query a class), on sampled tasks
      # (5,000 at 5 ways, 1,000 at 20: about 25,000 and 20,000 query predictions)
      local tasks=5000
      [ "${setting%%w*}" = 5 ] || tasks=1000
      "$FSLTOOL" evaluate "$run" --ensemble 5 --transductive --shape "${setting}1q" --episodes "$tasks" --sample-seed 0 -q \
        --json "results/omniglot-$method-$setting-pretrained$TAG-ensemble-transductive-1q.json"
    fi
    if [ -n "$ADAPT_STEPS" ]; then  # also after another number of fine-tuning steps, under both protocols
      "$FSLTOOL" evaluate "$run" --checkpoint "$CHECKPOINT" --adapt-steps "$ADAPT_STEPS" -q \
        --json "results/omniglot-$method-$setting-pretrained$TAG-${ADAPT_STEPS}steps.json"
      "$FSLTOOL" evaluate "$run" --checkpoint "$CHECKPOINT" --adapt-steps "$ADAPT_STEPS" --transductive -q \
        --json "results/omniglot-$method-$setting-pretrained$TAG-${ADAPT_STEPS}steps-transductive.json"
    fi
    mkdir -p "results/runs/${run##*/}"
    cp "$run/recipe.yaml" "$run/metrics.jsonl" "results/runs/${run##*/}/"
  done
}

for method in "${METHODS[@]}"; do
  if [ "$method" = protonet ]; then protonet; else adapting "$method"; fi
done
