#!/usr/bin/env bash
# Hunt flaky tests: run `make test` (the README's test command, install included) N times, each
# from a fresh clone of one commit, with fresh model caches, optionally beside a CPU-heavy job (CI
# machines are loaded too). One line per run goes to the summary: rc, wall time, pytest's tally.
#
#   bench/repeat_suite.sh [-n RUNS] [-r REV] [-l LOADED_RUNS] [-o OUT_DIR]
#
#   -n RUNS         how many runs (default 5)
#   -r REV          the commit to test (default HEAD of this checkout)
#   -l LOADED_RUNS  comma-separated run numbers that run beside a busy loop on one core (default 2,4)
#   -o OUT_DIR      where the logs and summary.txt go (default /tmp/nm-suite-runs)
#
# Each clone is deleted after its run (a venv is ~2.7 GB); its full log stays in OUT_DIR.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
runs=5 rev=HEAD loaded=2,4 out=/tmp/nm-suite-runs
while getopts "n:r:l:o:" opt; do
  case $opt in
    n) runs=$OPTARG ;; r) rev=$OPTARG ;; l) loaded=$OPTARG ;; o) out=$OPTARG ;;
    *) sed -n 2,13p "$0"; exit 2 ;;
  esac
done
sha=$(git -C "$repo" rev-parse "$rev")
data=${NM_SHARED_DATA:-$(cd "$repo/.." && pwd)/shared/data}
mkdir -p "$out"
summary="$out/summary.txt"
echo "# $(date -u +%FT%TZ) ${sha:0:12}: $runs runs of make test, loaded runs: $loaded" >>"$summary"
for i in $(seq 1 "$runs"); do
  work=$(mktemp -d /tmp/nm-suite-XXXXXX)
  git clone -q --no-local "$repo" "$work/main"
  git -C "$work/main" checkout -q "$sha"
  hog=""
  if [[ ",$loaded," == *",$i,"* ]]; then
    python3 -c "while True: pass" &
    hog=$!
  fi
  t0=$(date +%s)
  set +e
  (cd "$work/main" && NM_SHARED_DATA="$data" NM_CACHE="$work/nm-cache" HF_HOME="$work/hf" \
    make test) >"$out/run-$i.log" 2>&1
  rc=$?
  set -e
  t1=$(date +%s)
  [[ -n $hog ]] && kill "$hog"
  tally=$(grep -E "^=+ .*(passed|failed|error).* in " "$out/run-$i.log" | tail -1 | tr -d '=' || true)
  printf 'run %d: rc %d, %d s%s,%s\n' "$i" "$rc" "$((t1 - t0))" "${hog:+ (beside a busy core)}" \
    "${tally:- no pytest summary}" | tee -a "$summary"
  grep -E "^(FAILED|ERROR) " "$out/run-$i.log" | sed 's/^/    /' | tee -a "$summary" || true
  rm -rf "$work"
done
