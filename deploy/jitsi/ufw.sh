#!/usr/bin/env bash
# Firewall rules (ufw) for the Jitsi VPS.
#
#   deploy/jitsi/ufw.sh            apply the rules (as root)
#   deploy/jitsi/ufw.sh --print    print the commands only
#
# HTTPS for the site (Caddy; TCP 80 for the ACME challenge and the redirect,
# UDP 443 for HTTP/3) and UDP 10000 for the videobridge. Note that Docker
# publishes container ports through its own iptables rules, ahead of ufw: these
# rules document the intent and matter for anything not in a container, but
# they do not close a port Docker publishes. compose.yaml therefore binds the
# jicofo and jvb REST ports to 127.0.0.1 only.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JVB_PORT=10000
if [ -f "$here/.env" ]; then
  v=$(sed -n 's/^JVB_PORT=\([0-9][0-9]*\)$/\1/p' "$here/.env" | tail -n 1)
  JVB_PORT=${v:-$JVB_PORT}
fi

rules=(
  "allow 80/tcp comment 'Caddy: ACME challenge, redirect to HTTPS'"
  "allow 443/tcp comment 'Caddy: Jitsi Meet over HTTPS'"
  "allow 443/udp comment 'Caddy: HTTP/3'"
  "allow ${JVB_PORT}/udp comment 'Jitsi videobridge media'"
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
