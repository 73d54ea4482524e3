#!/usr/bin/env bash
# Every study of a sample set, in two lanes (one per core), then the reports rendered from the result stores.
#   bash sample_adapters/studies.sh [real|synthetic]     (log in /tmp/studies-<set>.log)
# Each command is resumable: the cells it finished are in sample_adapters/<set>/results/*.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:-real}
ROOT=sample_adapters/$SET
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the learned-merge study's settings (printed in its report): test examples scored per task, unlabeled
# inputs per task, random task subsets per k
LEARNED="--root $ROOT --limit 100 --samples 8 --subsets 1 --figure4-samples 5,10,25,50"
STATIC=averaging,task_arithmetic,multislerp,ties,breadcrumbs,della,tsv_m,iso_c,iso_cts,knots,core_space
LEARNT=ada_tl,ada_ll,kl_tl,js_tl,kl_ll,js_ll
t0=$(date +%s)
$PY -m sample_adapters.inclusion_report --root $ROOT
(   # lane 1: the static merges, Table 2, Figure 4, and three learned merges on the task subsets
    $PY -m sample_adapters.merge_report --root $ROOT --max-examples 100
    $PY -m sample_adapters.learned_report $LEARNED --methods $STATIC --sections table3,figure2 --out /tmp/lane1.md
    $PY -m sample_adapters.learned_report $LEARNED --methods averaging,ties --sections table2,figure4 --out /tmp/lane1b.md
    $PY -m sample_adapters.learned_report $LEARNED --methods ada_ll,kl_ll,js_ll --sections table3,figure2 --out /tmp/lane1c.md
) &
lane1=$!
(   # lane 2: the learned merges on every pair, then three of them on the task subsets
    $PY -m sample_adapters.learned_report $LEARNED --methods $LEARNT --sections table3 --out /tmp/lane2.md
    $PY -m sample_adapters.learned_report $LEARNED --methods ada_tl,kl_tl,js_tl --sections table3,figure2 --out /tmp/lane2b.md
) &
lane2=$!
wait $lane1 $lane2
# render: every cell is in the stores now, nothing is computed
$PY -m sample_adapters.learned_report $LEARNED --store-only
$PY -m sample_adapters.report --root $ROOT
echo "studies of $SET: $(( $(date +%s) - t0 )) s"
