#!/usr/bin/env bash
# Run (or resume) the small-scale ablations and regenerate their tables in results/small/.
# Safe to kill and rerun: each sweep skips the trials that FINISHED in results/small/mlflow.db
# (same trial_key), and the corpus and MNTP adapter are built once. Run from anywhere:
#
#   NM_SHARED_DATA=/path/to/shared/data experiments/small/run.sh [schedule pooling pooling-causal]
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p results/small
status=0
for name in "${@:-pooling pooling-causal schedule}"; do
  for one in $name; do
    harness sweep "experiments/small/$one.yaml" || status=1   # a failed trial: the others still count
    python experiments/small/compact_store.py results/small/mlflow.db   # committed: keep it small
    harness tables "experiments/small/$one.yaml" --output "results/small/r2/$one" --no-log || status=1
  done
done
exit $status
