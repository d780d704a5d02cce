#!/usr/bin/env bash
# Runs every test: first everything but the disruptive broker tests (two at a time), then the
# disruptive ones (they close every broker connection or restart the broker) one at a time.
#
# Needs RabbitMQ on 127.0.0.1:5672 (guest/guest); if it is down:
#   rabbitmq-server -detached && rabbitmqctl await_startup
# Extra arguments go to both nextest runs (e.g. --profile ci).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "cargo-nextest is missing: cargo install cargo-nextest --locked" >&2
    exit 1
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    echo "RabbitMQ is not reachable on 127.0.0.1:5672; start it with:" >&2
    echo "  rabbitmq-server -detached && rabbitmqctl await_startup" >&2
    exit 1
fi

status=0
cargo nextest run --workspace --all-targets \
    -E 'not test(/disruptive_/) and not kind(bench)' "$@" || status=$?
cargo nextest run --workspace --all-targets \
    -E 'test(/disruptive_/) and not kind(bench)' --test-threads 1 "$@" || status=$?
exit "$status"
