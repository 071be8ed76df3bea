#!/usr/bin/env bash
# Passes the whole test suite on a fresh machine: installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# Tools the test suite calls; more arrive with the proxy, HTTP and benchmark suites.
for tool in curl; do
  command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "missing tools: ${need_apt[*]} (install them, or run as root)" >&2
    exit 1
  fi
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo build --workspace --all-targets --locked
# nextest runs every test in its own process, so end-to-end tests cannot disturb each other.
# (The crates have no doctests; nextest does not run them.)
cargo nextest run --workspace --locked --no-fail-fast "$@"
