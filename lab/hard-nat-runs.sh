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
# The last one is a measurement (the strategy cannot work there), 5 runs.
for t in netcheck_classifies_every_lab_nat_kind a_random_nat_and_an_easy_one_go_direct_by_birthday_probing a_random_nat_and_an_easy_one_go_direct_over_tcp_by_birthday_probing a_random_nat_and_a_rst_answering_one_go_direct_past_a_router_by_ttl_limited_opening a_random_nat_and_a_rst_answering_one_past_a_router_over_quic two_random_nats_are_relayed_at_once a_predictable_nat_and_an_easy_one_go_direct two_predictable_nats_go_direct; do
    cargo test -p punch-lab --test netcheck "$t" -- --exact --nocapture --include-ignored 2>&1 | grep -E '^(LAB|\||test |random|\s+")' || true
done
PUNCH_LAB_RUNS=5 cargo test -p punch-lab --test netcheck a_random_nat_and_a_rst_answering_one_on_one_switch -- --exact --nocapture --include-ignored 2>&1 | grep -E '^(LAB|test |random|\s+")' || true
