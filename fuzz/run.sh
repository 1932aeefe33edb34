#!/usr/bin/env bash
# Runs every fuzz target for MINUTES each (default 1), one after the other,
# on the stable toolchain, and prints each one's executions, coverage and
# whether it found a crash.
#
#   fuzz/run.sh 10          # 10 minutes per target
#   fuzz/run.sh 1 datagram  # only some targets
#   fuzz/run.sh 30s         # a smoke run: 30 seconds per target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). `-s none` builds without a
# sanitizer, which is what works on stable; RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz pass the few -Z flags it still uses. Corpora are kept in
# fuzz/corpus/TARGET (seeded from fuzz/seeds/TARGET), crashes in
# fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")"
minutes="${1:-1}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none
case "$minutes" in
    *s) secs="${minutes%s}" ;;
    *) secs=$((minutes * 60)) ;;
esac
printf '%-16s %12s %8s %8s %s\n' target execs cov ft result
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    log="artifacts/$t/run.log"
    if cargo fuzz run -s none "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 >"$log" 2>&1; then
        result=ok
    else
        result="CRASH (see $log, artifacts/$t)"
        failed=1
    fi
    execs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
    last=$(grep -E '#[0-9]+.*(pulse|DONE|NEW|REDUCE)' "$log" | tail -1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    printf '%-16s %12s %8s %8s %s\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$result"
done
exit "$failed"
