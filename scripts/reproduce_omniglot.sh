#!/usr/bin/env bash
# Reproduce the Omniglot table: prepare the Vinyals split from ../shared/data/omniglot, meta-train each metric
# method, evaluate on the SAME 600 stored test episodes of each setting, write results/omniglot.md.
#
#   bash scripts/reproduce_omniglot.sh                        # all methods, all settings, the recipes' budgets
#   METHODS=relationnet SETTINGS="5w5s 20w1s" EPISODES=2000 bash scripts/reproduce_omniglot.sh
#   METHODS=protonet EPISODES_1SHOT=5000 EPISODES_5SHOT=3000 bash scripts/reproduce_omniglot.sh   # docs/results.md budget
#
#   METHODS="maml fomaml reptile" SETTINGS=5w5s EPISODES=300 OVERRIDES="validation.episodes=100" bash scripts/reproduce_omniglot.sh
#
# EPISODES overrides train.episodes for every recipe; EPISODES_1SHOT / EPISODES_5SHOT only for that shot;
# OVERRIDES (space-separated key=value) go to every meta-train. Methods that adapt a whole network per episode
# (maml, fomaml, reptile) also export their meta-learned body and record its prototype accuracy on the same 600
# stored test episodes (results/omniglot-<recipe>-export.json).
# Snell et al. train one Prototypical Network per shot with 60-way episodes and test it at 5 and 20 ways; so
# does this script when SHARE_WAYS=1 (default): protonet-5w1s is evaluated at 5w1s and 20w1s, protonet-5w5s at
# 5w5s and 20w5s. SHARE_WAYS=0 trains all four protonet recipes. The other methods train one model per setting,
# as their papers do.
set -euo pipefail
cd "$(dirname "$0")/.."
FSLTOOL=${FSLTOOL:-.venv/bin/fsltool}
OMNIGLOT=${OMNIGLOT:-../shared/data/omniglot}
METHODS=${METHODS:-protonet relationnet matchingnet}
SETTINGS=${SETTINGS:-5w1s 5w5s 20w1s 20w5s}
SHARE_WAYS=${SHARE_WAYS:-1}
mkdir -p data results
[ -f data/omniglot.h5 ] || "$FSLTOOL" prepare omniglot "$OMNIGLOT" data/omniglot.h5

budget() {  # setting -> train.episodes override, or nothing
  local shot=${1#*w} episodes=${EPISODES:-}
  [ "$shot" = 1s ] && episodes=${EPISODES_1SHOT:-$episodes}
  [ "$shot" = 5s ] && episodes=${EPISODES_5SHOT:-$episodes}
  [ -n "$episodes" ] && echo "train.episodes=$episodes"
  return 0
}

trained_by() {  # method setting -> the recipe whose model is evaluated at that setting
  if [ "$1" = protonet ] && [ "$SHARE_WAYS" = 1 ]; then echo "protonet-5w${2#*w}"; else echo "$1-$2"; fi
}

for method in $METHODS; do
  trained=" "
  for setting in $SETTINGS; do
    recipe=$(trained_by "$method" "$setting")
    if [[ "$trained" != *" $recipe "* ]]; then
      # shellcheck disable=SC2046  # budget prints zero or one word
      # shellcheck disable=SC2086  # OVERRIDES is a list of words
      "$FSLTOOL" meta-train "recipes/omniglot/$recipe.yaml" $(budget "$setting") ${OVERRIDES:-} --force --quiet
      trained="$trained$recipe "
    fi
    "$FSLTOOL" evaluate "runs/omniglot/$recipe" --shape "$setting" --json "results/omniglot-$method-$setting.json"
    case $method in maml | fomaml | reptile)
      "$FSLTOOL" export "runs/omniglot/$recipe" --verify-episodes 600 --json > "results/omniglot-$recipe-export.json" ;;
    esac
  done
done
.venv/bin/python scripts/results_table.py results > results/omniglot.md
cat results/omniglot.md
