#!/bin/sh
# The long fault-injecting soak (default 30 minutes), for BENCHMARKS.md:
#   sudo lab/soak.sh [MINUTES] [--seed S] [--json]
# Builds the workspace, then runs `punch-lab-tool soak`; exits as it does
# (1 if anything was corrupted, truncated, broken without a fault to explain
# it, never recovered, or the daemons grew). Logs: /tmp/punch-lab-soak/.
set -eu
cd "$(dirname "$0")/.."
minutes=30
case "${1:-}" in [0-9]*) minutes=$1; shift ;; esac
cargo build --workspace --quiet
exec target/debug/punch-lab-tool soak --minutes "$minutes" "$@"
