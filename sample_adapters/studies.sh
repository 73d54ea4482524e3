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
FIG2=averaging,ties,tsv_m,ada_tl,js_tl   # Figure 2's methods: the CPU budget of one session allowed five
(   # lane 1: every static merge on every pair (both studies), then Table 2
    $PY -m sample_adapters.merge_report --root $ROOT --max-examples 100
    $PY -m sample_adapters.learned_report $LEARNED --methods $STATIC --sections table3 --out /tmp/lane1.md
    $PY -m sample_adapters.learned_report $LEARNED --methods averaging,ties --sections table2 --out /tmp/lane1b.md
) &
lane1=$!
(   # lane 2: the learned merges on every pair, then Figure 4 and Figure 2
    $PY -m sample_adapters.learned_report $LEARNED --methods $LEARNT --sections table3 --out /tmp/lane2.md
    $PY -m sample_adapters.learned_report $LEARNED --methods averaging,ties --sections figure4 --out /tmp/lane2b.md
    $PY -m sample_adapters.learned_report $LEARNED --methods $FIG2 --sections figure2 --out /tmp/lane2c.md
) &
lane2=$!
wait $lane1 $lane2
# render: every cell is in the stores now, nothing is computed
$PY -m sample_adapters.learned_report $LEARNED --figure2-methods $FIG2 --store-only
$PY -m sample_adapters.report --root $ROOT
echo "studies of $SET: $(( $(date +%s) - t0 )) s"
