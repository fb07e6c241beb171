#!/usr/bin/env bash
# Firewall rules (ufw) for the relay VPS: exactly the ports turnd uses.
#
#   deploy/turn/ufw.sh            apply the rules (as root)
#   deploy/turn/ufw.sh --print    print the commands only
#
# The ports come from deploy/site.env (written by deploy/setup.sh); without
# it, the defaults: TURN on UDP and TCP 3478, TURN over TLS on TCP 443, relay
# ports UDP 49152-65535. The metrics/admin listener stays on 127.0.0.1 and
# gets no rule. Keep your SSH rule (ufw allow OpenSSH) before `ufw enable`.
#
# No rule for TCP 80: turnd gets its certificate by ACME with the TLS-ALPN-01
# challenge, which Let's Encrypt sends to TCP 443 (the TLS rule below, with
# the default TURNS_PORT). With certificate files from certbot instead, its
# DNS-01 challenge needs no port either; only certbot's HTTP-01 challenge
# (--standalone or --webroot) would need TCP 80 open, at the first issue and
# at every renewal (ufw allow 80/tcp).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
site="$here/../site.env"

TURN_PORT=3478 TURNS_PORT=443 RELAY_PORTS=49152-65535
if [ -f "$site" ]; then
  while IFS='=' read -r k v; do
    case "$k" in
      TURN_PORT | TURNS_PORT | RELAY_PORTS) printf -v "$k" '%s' "$v" ;;
    esac
  done < <(grep -E '^[A-Z_]+=' "$site")
fi

[[ "$TURN_PORT" =~ ^[0-9]+$ && "$TURNS_PORT" =~ ^[0-9]+$ && "$RELAY_PORTS" =~ ^[0-9]+-[0-9]+$ ]] || {
  echo "$site: TURN_PORT, TURNS_PORT or RELAY_PORTS is malformed" >&2
  exit 1
}

rules=(
  "allow ${TURN_PORT}/udp comment 'turnd TURN over UDP'"
  "allow ${TURN_PORT}/tcp comment 'turnd TURN over TCP'"
  "allow ${TURNS_PORT}/tcp comment 'turnd TURN over TLS'"
  "allow ${RELAY_PORTS/-/:}/udp comment 'turnd relay ports'"
)

if [ "${1:-}" = "--print" ]; then
  for r in "${rules[@]}"; do echo "ufw $r"; done
  exit 0
elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--print]" >&2
  exit 2
fi

command -v ufw >/dev/null || { echo "ufw is not installed (apt-get install ufw)" >&2; exit 1; }
for r in "${rules[@]}"; do
  eval "ufw $r"
done
echo "Rules added. If ufw is not enabled yet: ufw allow OpenSSH && ufw enable"
