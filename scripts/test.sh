#!/usr/bin/env bash
# Passes the whole test suite on a fresh machine: installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real components the end-to-end tests run: squid proxies (Basic via basic_ncsa_auth with an
# htpasswd file, NTLM via ntlm_fake_auth), and pyspnego as an independent NTLM implementation.
need_apt=()
[ -x /usr/sbin/squid ] || need_apt+=(squid)
command -v htpasswd >/dev/null 2>&1 || need_apt+=(apache2-utils)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)
# Headless Chromium renders the gateway's status page and pages through /~~name.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
# The HTTPS tests make a test CA and certificates with the openssl command line.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# PROXY protocol peers: HAProxy (accept-proxy, send-proxy) and nginx (listen ... proxy_protocol).
[ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
# The access-rule tests put gateway, agents and clients in network namespaces of their own.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    # The package starts a system-wide squid on :3128; the tests start their own.
    (systemctl stop squid || service squid stop || pkill -x squid) >/dev/null 2>&1 || true
    # Likewise the system-wide HAProxy and nginx; the tests start their own on free ports.
    (systemctl stop haproxy nginx || service haproxy stop; service nginx stop) >/dev/null 2>&1 || true
  else
    echo "missing packages: ${need_apt[*]} (install them, or run as root)" >&2
    exit 1
  fi
fi
# pyspnego: an independent NTLM implementation; prometheus_client: the reference parser of
# the metrics exposition format; websockets: a real WebSocket client and server.
for module in spnego:pyspnego prometheus_client:prometheus_client websockets:websockets; do
  if ! python3 -c "import ${module%%:*}" >/dev/null 2>&1; then
    python3 -m pip install --quiet "${module##*:}" ||
      python3 -m pip install --quiet --break-system-packages "${module##*:}"
  fi
done

if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo build --workspace --all-targets --locked
# nextest runs every test in its own process, so end-to-end tests cannot disturb each other.
# (The crates have no doctests; nextest does not run them.)
cargo nextest run --workspace --locked --no-fail-fast "$@"
# Conformance: every end-to-end test again with gateways and agents on the io_uring runtime.
DIALBACK_TEST_RUNTIME=uring cargo nextest run -p dialback --locked --no-fail-fast \
  -E 'kind(test)' "$@"
