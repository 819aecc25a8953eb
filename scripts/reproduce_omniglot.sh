#!/usr/bin/env bash
# Reproduce the Omniglot table: prepare the Vinyals split from ../shared/data/omniglot, meta-train
# Prototypical Networks, evaluate on the 600 stored test episodes of each setting, write results/omniglot.md.
#
#   bash scripts/reproduce_omniglot.sh                 # the four recipes at their full budget
#   EPISODES_1SHOT=5000 EPISODES_5SHOT=3000 bash scripts/reproduce_omniglot.sh   # the README's budget
#
# Snell et al. train one model per shot with 60-way episodes and test it at 5 and 20 ways; so does this
# script when SHARE_WAYS=1 (default): the 5w1s recipe's model is evaluated at 5w1s and 20w1s, the 5w5s
# recipe's at 5w5s and 20w5s. SHARE_WAYS=0 trains all four recipes.
set -euo pipefail
cd "$(dirname "$0")/.."
FSLTOOL=${FSLTOOL:-.venv/bin/fsltool}
OMNIGLOT=${OMNIGLOT:-../shared/data/omniglot}
SHARE_WAYS=${SHARE_WAYS:-1}
mkdir -p data results
[ -f data/omniglot.h5 ] || "$FSLTOOL" prepare omniglot "$OMNIGLOT" data/omniglot.h5

train() {  # recipe episodes
  local extra=()
  [ -n "$2" ] && extra+=("train.episodes=$2")
  "$FSLTOOL" meta-train "recipes/omniglot/protonet-$1.yaml" "${extra[@]}" --force --quiet
}
train 5w1s "${EPISODES_1SHOT:-}"
train 5w5s "${EPISODES_5SHOT:-}"
if [ "$SHARE_WAYS" = 0 ]; then
  train 20w1s "${EPISODES_1SHOT:-}"
  train 20w5s "${EPISODES_5SHOT:-}"
fi
for setting in 5w1s 5w5s 20w1s 20w5s; do
  shot=${setting#*w}
  run=runs/omniglot/protonet-$setting
  [ "$SHARE_WAYS" = 1 ] && run=runs/omniglot/protonet-5w$shot
  "$FSLTOOL" evaluate "$run" --shape "$setting" --json "results/omniglot-protonet-$setting.json"
done
.venv/bin/python scripts/results_table.py results > results/omniglot.md
cat results/omniglot.md
