#!/usr/bin/env bash
# Prints the prosody configuration that the TURN settings of a docker-jitsi-meet
# .env turn into: external_service_secret and the external_services list
# (XEP-0215), as Lua.
#
#   deploy/jitsi/external-services.sh [ENV_FILE]      (default: deploy/jitsi/.env)
#
# It follows the prosody.cfg.lua template of docker-jitsi-meet at the pinned tag
# (prosody/rootfs/defaults/prosody.cfg.lua, stable-11146-2) entry for entry,
# with the same defaults:
#   STUN_HOST set            { type = "stun", host, port = STUN_PORT (443), transport = "udp" }
#   per TURN_HOST x TURN_TRANSPORT (default "tcp")
#                            { type = "turn", host, port = TURN_PORT (443), transport, ttl = TURN_TTL (86400),
#                              secret = true, algorithm = "turn" }
#   per TURNS_HOST           { type = "turns", host, port = TURNS_PORT (443), transport = "tcp", ttl,
#                              secret = true, algorithm = "turn" }
# (secret/algorithm only with TURN_CREDENTIALS; username/password with
# TURN_USERNAME/TURN_PASSWORD.) The container additionally enables the
# "external_services" module whenever TURN_HOST or TURNS_HOST is set.
#
# Uses: setup.sh writes the result to deploy/jitsi/prosody-external-services.cfg.lua
# for reference; the tests load that file into a real prosody; and a Jitsi
# installed from Debian packages (prosody outside Docker) can Include it from
# /etc/prosody/conf.d/ (then also add "external_services" to modules_enabled).
#
# Ports must be numbers: prosody drops a quoted port with only a warning and
# clients fall back to a default port, so a non-numeric port is an error here.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
env_file=${1:-$here/.env}
[ -r "$env_file" ] || { echo "external-services.sh: cannot read $env_file" >&2; exit 1; }

# Read KEY=VALUE lines without executing the file.
declare -A env=()
while IFS= read -r line || [ -n "$line" ]; do
  [[ "$line" =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
  k=${BASH_REMATCH[1]} v=${BASH_REMATCH[2]}
  # Surrounding quotes, as compose accepts them.
  if [[ "$v" =~ ^\"(.*)\"$ || "$v" =~ ^\'(.*)\'$ ]]; then v=${BASH_REMATCH[1]}; fi
  env[$k]=$v
done <"$env_file"

get() { printf '%s' "${env[$1]:-$2}"; }
die() { echo "external-services.sh: $env_file: $*" >&2; exit 1; }
number() {
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a plain number, not \`$2\` (prosody ignores a non-numeric port)"
  printf '%d' "$((10#$2))"
}
lua_string() {
  [[ "$2" =~ ^[A-Za-z0-9._:@~+/=-]*$ ]] || die "$1 holds characters that need quoting: \`$2\`"
  printf '"%s"' "$2"
}
list() { tr ',' '\n' <<<"$1" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//' | grep -v '^$' || true; }

secret=$(get TURN_CREDENTIALS "")
stun_host=$(get STUN_HOST "")
turn_host=$(get TURN_HOST "")
turns_host=$(get TURNS_HOST "")
stun_port=$(number STUN_PORT "$(get STUN_PORT 443)")
turn_port=$(number TURN_PORT "$(get TURN_PORT 443)")
turns_port=$(number TURNS_PORT "$(get TURNS_PORT 443)")
ttl=$(number TURN_TTL "$(get TURN_TTL 86400)")
transports=$(get TURN_TRANSPORT tcp)
username=$(get TURN_USERNAME "")
password=$(get TURN_PASSWORD "")

extra() {
  if [ -n "$secret" ]; then printf '    secret = true,\n    algorithm = "turn",\n'; fi
  if [ -n "$username" ]; then printf '    username = %s,\n' "$(lua_string TURN_USERNAME "$username")"; fi
  if [ -n "$password" ]; then printf '    password = %s,\n' "$(lua_string TURN_PASSWORD "$password")"; fi
}

echo "-- XEP-0215 external services for prosody, from $(basename "$env_file") (deploy/jitsi/external-services.sh)."
echo "-- Needs the \"external_services\" module (docker-jitsi-meet's prosody enables it when TURN_HOST or TURNS_HOST is set)."
if [ -n "$secret" ]; then
  echo "external_service_secret = $(lua_string TURN_CREDENTIALS "$secret");"
fi
if [ -z "$stun_host$turn_host$turns_host" ]; then
  exit 0
fi
echo "external_services = {"
if [ -n "$stun_host" ]; then
  # One host, not a list (as in the template).
  printf '  { type = "stun", host = %s, port = %s, transport = "udp" },\n' "$(lua_string STUN_HOST "$stun_host")" "$stun_port"
fi
while read -r h; do
  [ -n "$h" ] || continue
  while read -r t; do
    case "$t" in udp | tcp) ;; *) die "TURN_TRANSPORT: \`$t\` is not udp or tcp" ;; esac
    printf '  {\n    type = "turn",\n    host = %s,\n    port = %s,\n    transport = "%s",\n    ttl = %s,\n' \
      "$(lua_string TURN_HOST "$h")" "$turn_port" "$t" "$ttl"
    extra
    printf '  },\n'
  done < <(list "$transports")
done < <(list "$turn_host")
while read -r h; do
  [ -n "$h" ] || continue
  printf '  {\n    type = "turns",\n    host = %s,\n    port = %s,\n    transport = "tcp",\n    ttl = %s,\n' \
    "$(lua_string TURNS_HOST "$h")" "$turns_port" "$ttl"
  extra
  printf '  },\n'
done < <(list "$turns_host")
echo "};"
