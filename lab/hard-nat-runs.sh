#!/bin/sh
# Hard-NAT scenarios 20 times each (CI runs 2), printing the counts
# (issue #21). Root, like every lab test; one lab test at a time.
#   lab/hard-nat-runs.sh            # 20 runs each
#   RUNS=5 lab/hard-nat-runs.sh
set -eu
cd "$(dirname "$0")/.."
RUNS="${RUNS:-20}"
export PUNCH_LAB_RUNS="$RUNS"
cargo build -p punchd -p punch-rendezvous
for t in netcheck_classifies_every_lab_nat_kind a_random_nat_and_an_easy_one_go_direct_by_birthday_probing a_random_nat_and_an_easy_one_go_direct_over_tcp_by_birthday_probing two_random_nats_are_relayed_at_once a_predictable_nat_and_an_easy_one_go_direct two_predictable_nats_go_direct; do
    cargo test -p punch-lab --test netcheck "$t" -- --exact --nocapture 2>&1 | grep -E '^(LAB|\||test )' || true
done
