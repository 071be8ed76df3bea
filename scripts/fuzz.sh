#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target of fuzz/ for SECONDS each (default 30).
#
#   scripts/fuzz.sh            # smoke run, 30 s per target
#   scripts/fuzz.sh 3600       # long campaign, one hour per target
#   scripts/fuzz.sh 60 intake  # only the named targets
#
# Environment: FUZZ_JOBS=N runs N targets at once (default 1); FUZZ_ARGS adds libFuzzer
# flags (e.g. FUZZ_ARGS="-max_len=8192").
#
# Each target starts from its checked-in seeds (fuzz/corpus/<target>, never written) and a
# working corpus under fuzz/target/corpus/<target> that persists between runs, so a long
# campaign picks up where the last one stopped. Crashes land in fuzz/artifacts/<target>/.
# Built in release mode with debug assertions and overflow checks on (-a).
# Exits non-zero if any target crashed (or failed to build); prints one summary line per
# target from libFuzzer's final stats.
set -euo pipefail

SECONDS_EACH="${1:-30}"
shift || true
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$ROOT/fuzz"
JOBS="${FUZZ_JOBS:-1}"

if ! [[ "$SECONDS_EACH" =~ ^[0-9]+$ ]] || [ "$SECONDS_EACH" -eq 0 ]; then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz..." >&2
    cargo install cargo-fuzz --locked
fi

cd "$FUZZ"
if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo +nightly fuzz list)
fi

echo "building ${#TARGETS[@]} targets..." >&2
cargo +nightly fuzz build --debug-assertions >&2

LOGS="$FUZZ/target/fuzz-logs"
mkdir -p "$LOGS"

run_one() {
    local t="$1"
    mkdir -p "target/corpus/$t" "corpus/$t"
    # shellcheck disable=SC2086
    cargo +nightly fuzz run --debug-assertions "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -print_final_stats=1 ${FUZZ_ARGS:-} \
        >"$LOGS/$t.log" 2>&1
}

pids=()
names=()
status=0
for t in "${TARGETS[@]}"; do
    run_one "$t" &
    pids+=("$!")
    names+=("$t")
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do
        sleep 1
    done
done

fail=0
for i in "${!pids[@]}"; do
    t="${names[$i]}"
    if wait "${pids[$i]}"; then rc=0; else rc=$?; fi
    log="$LOGS/$t.log"
    # libFuzzer's final stats; the last status line gives coverage (edges) and features.
    execs=$( (grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" || true) |
        grep -Eo '[0-9]+$' | tail -1 || true)
    cov=$( (grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" || true) | tail -1 |
        sed -E 's/cov: ([0-9]+) ft: ([0-9]+)/\1 \2/')
    read -r edges features <<<"${cov:-? ?}"
    corpus=$(find "$FUZZ/target/corpus/$t" -type f 2>/dev/null | wc -l)
    if [ "$rc" -eq 0 ]; then
        verdict=ok
    else
        verdict="CRASH (exit $rc, see $log and fuzz/artifacts/$t/)"
        fail=1
    fi
    printf '%-18s %6ss  execs %10s  cov %6s  ft %7s  corpus %5s  %s\n' \
        "$t" "$SECONDS_EACH" "${execs:-?}" "$edges" "$features" "$corpus" "$verdict"
done
[ "$fail" -eq 0 ] || status=1
exit "$status"
