#!/bin/sh
# Runs libFuzzer targets for a bounded time each and writes one summary line
# per target to DIR/summary-TARGET.txt:
#   target=T result=ok|crash|error seconds=S execs=N corpus=C artifacts=A
# Usage: sh bench/fuzz/run.sh DIR SECONDS TARGET...   (from the repository root)
# Exit status: 1 if any target found a crash (its input is in DIR/artifacts).
set -u
DIR=$1
SECONDS_EACH=$2
shift 2
status=0
for t in "$@"; do
    bin="$DIR/${t}_fuzz"
    corpus="$DIR/corpus-$t"
    mkdir -p "$corpus" "$DIR/artifacts"
    log="$DIR/fuzz-$t.log"
    dict=$t; [ "$t" = head ] && dict=http # heads are what both targets read
    echo "  FUZZ    $t for ${SECONDS_EACH}s"
    start=$(date +%s)
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1} \
        "$bin" -max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
        -dict="bench/fuzz/$dict.dict" -artifact_prefix="$DIR/artifacts/$t-" "$corpus" "bench/fuzz/corpus/$t" \
        >"$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    ncorpus=$(ls "$corpus" | wc -l)
    arts=$(ls "$DIR/artifacts" 2>/dev/null | grep -c "^$t-" || true)
    if [ $rc -eq 0 ]; then result=ok; elif grep -q "ERROR: libFuzzer\|ERROR: AddressSanitizer\|==ERROR\|deadly signal\|Timeout" "$log"; then result=crash; status=1; else result=error; status=1; fi
    echo "target=$t result=$result seconds=$took execs=${execs:-0} corpus=$ncorpus artifacts=$arts exit=$rc" >"$DIR/summary-$t.txt"
    cat "$DIR/summary-$t.txt"
    if [ "$result" != ok ]; then tail -40 "$log" >&2; fi
done
exit $status
