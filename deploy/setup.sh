#!/usr/bin/env bash
# Sets up both machines of a Jitsi Meet site with its own TURN relay from a few
# answers, and prints the DNS records and firewall rules to create.
#
#   deploy/setup.sh                      asks for what it does not know yet
#   deploy/setup.sh --meet-domain meet.example.com --turn-domain turn.example.com \
#     --meet-ip 198.51.100.20 --turn-ip 203.0.113.10 --email ops@example.com
#
# Every answer can also come from the environment (MEET_DOMAIN, TURN_DOMAIN,
# MEET_IP, TURN_IP, ACME_EMAIL, TURN_PORT, TURNS_PORT, RELAY_PORTS, TURN_TTL,
# TURN_HOSTS);
# flags win over the environment, which wins over the answers saved by the last
# run in deploy/site.env. Without a terminal (or with --non-interactive) it
# never asks and fails on a missing answer.
#
# It writes (only files whose content changes; a second run with the same
# answers changes nothing):
#   deploy/site.env                          the answers (no secrets)
#   deploy/turn/etc/secret                   the shared secret, generated once
#   deploy/turn/etc/turnd.toml               the relay's config, from turn/turnd.toml.template
#   deploy/turn/.env                         compose settings for the relay
#   deploy/jitsi/.env                        docker-jitsi-meet settings incl. TURN_CREDENTIALS
#   deploy/jitsi/prosody-external-services.cfg.lua   what prosody makes of jitsi/.env
# and creates the data directories under deploy/jitsi/config/ and an empty
# deploy/turn/etc/tls/ (the mount point for certificate files, when the relay
# reads them instead of getting its certificate by ACME itself).
#
# The secret is generated once (turnctl secret; openssl rand -hex 32 when
# turnctl is not built) and then kept: an existing deploy/turn/etc/secret or
# TURN_CREDENTIALS in deploy/jitsi/.env is reused, and the two must agree.
# --rotate-secret puts a new secret first in the relay's file and keeps the old
# one on the next line, so credentials already handed out stay valid.
#
# Once deploy/site.env exists (the site was set up), a run generates no new
# secret: on a copy holding only part of deploy/ it writes what follows from
# the files there and leaves the rest out. A copy without deploy/jitsi/.env
# (the relay's: turn/etc and site.env) gets no Jitsi side, since a new .env
# would carry other internal XMPP passwords than the Jitsi VPS uses; a copy
# with neither the relay's secret nor jitsi/.env is refused. Within an
# existing jitsi/.env, only missing internal passwords are generated.
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

# The container user of the relay image (deploy/turn/Dockerfile) and of the
# docker-jitsi-meet images.
TURND_GID=65532
JITSI_UID=1000

usage() {
  cat <<'EOF'
Usage: deploy/setup.sh [options]

Answers (each also read from the environment variable in brackets):
  --meet-domain NAME     DNS name of the Jitsi site, e.g. meet.example.com   [MEET_DOMAIN]
  --turn-domain NAME     DNS name of the relay, e.g. turn.example.com        [TURN_DOMAIN]
  --meet-ip IPV4         public IPv4 address of the Jitsi VPS                [MEET_IP]
  --turn-ip IPV4         public IPv4 address of the relay VPS                [TURN_IP]
  --email ADDRESS        Let's Encrypt account e-mail (turnd, Caddy)         [ACME_EMAIL]
  --turn-port N          TURN over UDP and TCP (default 3478)                [TURN_PORT]
  --turns-port N         TURN over TLS (default 443)                         [TURNS_PORT]
  --relay-ports LOW-HIGH relay port range (default 49152-65535)              [RELAY_PORTS]
  --turn-ttl SECONDS     lifetime of the credentials prosody hands out (default 86400) [TURN_TTL]
  --turn-hosts A,B,...   every relay prosody hands out, when several share the secret
                         (default: the --turn-domain)                         [TURN_HOSTS]

Other:
  --rotate-secret        generate a new shared secret, keeping the old one valid on the relay
  -n, --non-interactive  never ask; fail when an answer is missing
  -h, --help             this text
EOF
}

die() { echo "setup.sh: $*" >&2; exit 1; }

answers=(MEET_DOMAIN TURN_DOMAIN MEET_IP TURN_IP ACME_EMAIL TURN_PORT TURNS_PORT RELAY_PORTS TURN_TTL TURN_HOSTS)
declare -A defaults=([TURN_PORT]=3478 [TURNS_PORT]=443 [RELAY_PORTS]=49152-65535 [TURN_TTL]=86400)
declare -A prompts=(
  [MEET_DOMAIN]="DNS name of the Jitsi site (e.g. meet.example.com)"
  [TURN_DOMAIN]="DNS name of the relay (e.g. turn.example.com)"
  [MEET_IP]="Public IPv4 address of the Jitsi VPS"
  [TURN_IP]="Public IPv4 address of the relay VPS"
  [ACME_EMAIL]="E-mail address for Let's Encrypt (the relay's and the site's certificates)"
)

declare -A from_flags=()
interactive=auto
rotate=0
while [ $# -gt 0 ]; do
  arg=$1
  shift
  case "$arg" in
    --*=*) set -- "${arg#*=}" "$@"; arg=${arg%%=*} ;;
  esac
  case "$arg" in
    --meet-domain | --turn-domain | --meet-ip | --turn-ip | --email | --turn-port | --turns-port | --relay-ports | --turn-ttl | --turn-hosts)
      [ $# -gt 0 ] || die "$arg needs a value"
      case "$arg" in
        --email) key=ACME_EMAIL ;;
        *) key=${arg#--}; key=${key//-/_}; key=${key^^} ;;
      esac
      from_flags[$key]=$1
      shift
      ;;
    --rotate-secret) rotate=1 ;;
    -n | --non-interactive) interactive=no ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $arg" ;;
  esac
done
if [ "$interactive" = auto ]; then
  if [ -t 0 ] && [ -t 1 ]; then interactive=yes; else interactive=no; fi
fi

# KEY=VALUE files, read without executing them.
read_kv() { # file key
  [ -f "$1" ] || return 0
  sed -n "s/^$2=//p" "$1" | tail -n 1
}

site="$here/site.env"
turn_dir="$here/turn"
jitsi_dir="$here/jitsi"
secret_file="$turn_dir/etc/secret"
jitsi_env="$jitsi_dir/.env"

# Set up before (the answers are saved), perhaps on another machine: this run
# keeps what that one generated and makes no second version of it.
rerun=0
[ -f "$site" ] && rerun=1
# The Jitsi side is written on a first run, or where its .env is.
jitsi_side=1
[ "$rerun" -eq 1 ] && [ ! -f "$jitsi_env" ] && jitsi_side=0

# --- answers -------------------------------------------------------------
declare -A val=()
for k in "${answers[@]}"; do
  if [ -n "${from_flags[$k]:-}" ]; then
    val[$k]=${from_flags[$k]}
  elif [ -n "${!k:-}" ]; then
    val[$k]=${!k}
  else
    val[$k]=$(read_kv "$site" "$k")
  fi
  if [ -z "${val[$k]}" ] && [ -n "${defaults[$k]:-}" ]; then
    val[$k]=${defaults[$k]}
  fi
  if [ -z "${val[$k]}" ] && [ "$k" = TURN_HOSTS ]; then
    val[$k]=${val[TURN_DOMAIN]}
  fi
  if [ -z "${val[$k]}" ]; then
    [ "$interactive" = yes ] || die "missing ${k} (--$(tr '_A-Z' '-a-z' <<<"$k" | sed 's/acme-//'), or the environment variable $k)"
    read -r -p "${prompts[$k]}: " "val[$k]" || die "no answer for $k"
  fi
done

is_name() { [[ "$1" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$ ]]; }
is_ipv4() {
  [[ "$1" =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
  local o
  for o in "${BASH_REMATCH[@]:1}"; do [ "$((10#$o))" -le 255 ] || return 1; done
}
is_port() { [[ "$1" =~ ^[0-9]{1,5}$ ]] && [ "$((10#$1))" -ge 1 ] && [ "$((10#$1))" -le 65535 ]; }

is_name "${val[MEET_DOMAIN]}" || die "MEET_DOMAIN: \`${val[MEET_DOMAIN]}\` is not a DNS name"
is_name "${val[TURN_DOMAIN]}" || die "TURN_DOMAIN: \`${val[TURN_DOMAIN]}\` is not a DNS name"
IFS=, read -r -a hosts <<<"${val[TURN_HOSTS]}"
[ "${#hosts[@]}" -gt 0 ] || die "TURN_HOSTS is empty"
for h in "${hosts[@]}"; do
  is_name "$h" || die "TURN_HOSTS: \`$h\` is not a DNS name (comma-separated list, no spaces)"
  [ "$h" != "${val[MEET_DOMAIN]}" ] || die "TURN_HOSTS: the relays and MEET_DOMAIN must differ"
done
[ "${val[MEET_DOMAIN]}" != "${val[TURN_DOMAIN]}" ] ||
  die "MEET_DOMAIN and TURN_DOMAIN must differ: the relay owns TCP 443 on its own machine"
is_ipv4 "${val[MEET_IP]}" || die "MEET_IP: \`${val[MEET_IP]}\` is not an IPv4 address"
is_ipv4 "${val[TURN_IP]}" || die "TURN_IP: \`${val[TURN_IP]}\` is not an IPv4 address"
[[ "${val[ACME_EMAIL]}" =~ ^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$ ]] || die "ACME_EMAIL: \`${val[ACME_EMAIL]}\` is not an e-mail address"
is_port "${val[TURN_PORT]}" || die "TURN_PORT: \`${val[TURN_PORT]}\` is not a port number"
is_port "${val[TURNS_PORT]}" || die "TURNS_PORT: \`${val[TURNS_PORT]}\` is not a port number"
[[ "${val[RELAY_PORTS]}" =~ ^([0-9]{1,5})-([0-9]{1,5})$ ]] || die "RELAY_PORTS: \`${val[RELAY_PORTS]}\` is not LOW-HIGH"
lo=$((10#${BASH_REMATCH[1]})) hi=$((10#${BASH_REMATCH[2]}))
[ "$lo" -ge 1024 ] && [ "$hi" -le 65535 ] && [ "$lo" -lt "$hi" ] || die "RELAY_PORTS: \`${val[RELAY_PORTS]}\` must lie within 1024-65535, low below high"
for p in "${val[TURN_PORT]}" "${val[TURNS_PORT]}"; do
  if [ "$((10#$p))" -ge "$lo" ] && [ "$((10#$p))" -le "$hi" ]; then
    die "RELAY_PORTS ${val[RELAY_PORTS]} contains the listener port $p"
  fi
done
[[ "${val[TURN_TTL]}" =~ ^[0-9]+$ ]] && [ "$((10#${val[TURN_TTL]}))" -ge 60 ] || die "TURN_TTL: \`${val[TURN_TTL]}\` must be a number of seconds, at least 60"
# Plain numbers only, in canonical form (prosody needs a number, not a string).
for k in TURN_PORT TURNS_PORT TURN_TTL; do val[$k]=$((10#${val[$k]})); done
val[RELAY_PORTS]="$lo-$hi"

# --- files ---------------------------------------------------------------
changed=()
unchanged=()

# Sets mode (and group, when given and we are root) only when they differ, so
# a re-run does not even touch the inode.
fix_perms() { # path mode [group]
  [ "$(stat -c %a "$1")" = "$2" ] || chmod "$2" "$1"
  if [ -n "${3:-}" ] && [ "$(id -u)" -eq 0 ] && [ "$(stat -c %g "$1")" != "$3" ]; then
    chgrp "$3" "$1"
  fi
}

# Writes content to path unless the file already holds exactly that.
put() { # path mode content [group]
  local path=$1 mode=$2 content=$3 group=${4:-} cur tmp
  if [ -f "$path" ]; then
    cur=$(cat "$path"; printf x)
    if [ "${cur%x}" = "$content" ]; then
      fix_perms "$path" "$mode" "$group"
      unchanged+=("${path#"$repo"/}")
      return
    fi
  fi
  mkdir -p "$(dirname "$path")"
  tmp=$(mktemp "$path.XXXXXX")
  printf '%s' "$content" >"$tmp"
  fix_perms "$tmp" "$mode" "$group"
  mv -f "$tmp" "$path"
  changed+=("${path#"$repo"/}")
}

make_dir() { # path mode [owner]
  if [ ! -d "$1" ]; then
    mkdir -p "$1"
    changed+=("${1#"$repo"/}/")
  fi
  [ "$(stat -c %a "$1")" = "$2" ] || chmod "$2" "$1"
  if [ -n "${3:-}" ] && [ "$(id -u)" -eq 0 ] && [ "$(stat -c %u:%g "$1")" != "$3" ]; then
    chown "$3" "$1"
  fi
}

# Template with @KEY@ markers -> text. Every marker must have a value.
declare -A subst=()
render() { # template
  local text m
  text=$(cat "$1"; printf x)
  text=${text%x}
  for m in $(grep -oE '@[A-Z][A-Z0-9_]*@' "$1" | sort -u); do
    m=${m//@/}
    [ -n "${subst[$m]:-}" ] || die "$1: no value for @$m@"
    text=${text//@$m@/${subst[$m]}}
  done
  printf '%s' "$text"
}

secret_ok() { [[ "$1" =~ ^[A-Za-z0-9._~+/=-]{16,256}$ ]]; }

gen_secret() {
  local c s
  for c in "${TURNCTL:-}" "$(command -v turnctl || true)" "$repo/target/release/turnctl" "$repo/target/debug/turnctl"; do
    if [ -n "$c" ] && [ -x "$c" ] && s=$("$c" secret 2>/dev/null) && secret_ok "$s"; then
      echo "Generated a new shared secret with $c." >&2
      echo "$s"
      return
    fi
  done
  command -v openssl >/dev/null || die "neither turnctl nor openssl is available to generate the secret"
  echo "Generated a new shared secret with openssl rand (turnctl is not built)." >&2
  openssl rand -hex 32
}

# --- the shared secret ---------------------------------------------------
file_secrets=()
if [ -f "$secret_file" ]; then
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}
    line=$(sed 's/^[[:space:]]*//; s/[[:space:]]*$//' <<<"$line")
    [ -n "$line" ] && file_secrets+=("$line")
  done <"$secret_file"
  [ "${#file_secrets[@]}" -gt 0 ] || die "$secret_file exists but holds no secret"
fi
env_secret=$(read_kv "$jitsi_env" TURN_CREDENTIALS)

if [ "${#file_secrets[@]}" -gt 0 ]; then
  secret=${file_secrets[0]}
  if [ -n "$env_secret" ] && [ "$env_secret" != "$secret" ]; then
    known=0
    for s in "${file_secrets[@]}"; do [ "$s" = "$env_secret" ] && known=1; done
    # An older secret still listed on the relay: a rotation in progress, adopt the new one.
    [ "$known" -eq 1 ] || die "the relay's secret ($secret_file) and TURN_CREDENTIALS in $jitsi_env differ.
Both sides must share one secret. Keep the right one in one place, delete the other (the file, or the
TURN_CREDENTIALS line), and run setup.sh again."
  fi
elif [ -n "$env_secret" ]; then
  secret=$env_secret
elif [ "$rerun" -eq 1 ]; then
  die "$site shows this site was set up before, but this copy holds neither its shared secret
($secret_file) nor $jitsi_env. A new secret here would not match the one the relay and prosody
use. Copy deploy/turn/etc/secret (or deploy/jitsi/.env) from the machine where you first ran
setup.sh and run it again; for a new site, delete $site first."
else
  secret=$(gen_secret)
fi
if [ "$rotate" -eq 1 ] && [ "$jitsi_side" -eq 0 ]; then
  die "--rotate-secret: $jitsi_env is not in this copy, so prosody would not get the new secret.
Rotate on the machine where you first ran setup.sh, which holds both sides."
fi
for s in "$secret" "${file_secrets[@]}"; do
  secret_ok "$s" || die "the shared secret must be 16-256 characters from A-Z a-z 0-9 . _ ~ + / = -"
done
secret_text=$(cat "$secret_file" 2>/dev/null; printf x)
secret_text=${secret_text%x}
if [ "${#file_secrets[@]}" -eq 0 ]; then
  secret_text="$secret"$'\n'
fi
if [ "$rotate" -eq 1 ]; then
  new=$(gen_secret)
  secret_text="$new"$'\n'"$secret"$'\n'
  secret=$new
fi

# --- render --------------------------------------------------------------
for k in "${answers[@]}"; do subst[$k]=${val[$k]}; done
subst[TURN_SECRET]=$secret
subst[JICOFO_AUTH_PASSWORD]=$(read_kv "$jitsi_env" JICOFO_AUTH_PASSWORD)
subst[JVB_AUTH_PASSWORD]=$(read_kv "$jitsi_env" JVB_AUTH_PASSWORD)
# Internal XMPP passwords (as docker-jitsi-meet's gen-passwords.sh makes them), kept once set.
password() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }
[ -n "${subst[JICOFO_AUTH_PASSWORD]}" ] || subst[JICOFO_AUTH_PASSWORD]=$(password)
[ -n "${subst[JVB_AUTH_PASSWORD]}" ] || subst[JVB_AUTH_PASSWORD]=$(password)

site_text="# Answers given to deploy/setup.sh (no secrets). Edit and run setup.sh again to apply.
"
for k in "${answers[@]}"; do
  v=${val[$k]}
  # Empty: "the relay of TURN_DOMAIN only", which follows a changed TURN_DOMAIN.
  if [ "$k" = TURN_HOSTS ] && [ "$v" = "${val[TURN_DOMAIN]}" ]; then v=; fi
  site_text+="$k=$v"$'\n'
done

# The relay: readable by the container's group when set up as root. A copy
# made with scp or rsync (without numeric owners) loses that group; running
# setup.sh again as root on the relay sets it back, even when nothing else
# changes.
make_dir "$turn_dir/etc" 0750
fix_perms "$turn_dir/etc" 0750 "$TURND_GID"
make_dir "$turn_dir/etc/tls" 0750
fix_perms "$turn_dir/etc/tls" 0750 "$TURND_GID"
put "$secret_file" 0640 "$secret_text" "$TURND_GID"
# (Rendered into variables first: a failure inside $(...) then stops the script.)
text=$(render "$turn_dir/turnd.toml.template")
put "$turn_dir/etc/turnd.toml" 0640 "$text"$'\n' "$TURND_GID"
text=$(render "$turn_dir/env.template")
put "$turn_dir/.env" 0644 "$text"$'\n'

# Jitsi.
if [ "$jitsi_side" -eq 1 ]; then
  text=$(render "$jitsi_dir/env.template")
  put "$jitsi_env" 0600 "$text"$'\n'
  text=$("$jitsi_dir/external-services.sh" "$jitsi_env")
  put "$jitsi_dir/prosody-external-services.cfg.lua" 0600 "$text"$'\n'
  for d in web storage/web storage/transcripts storage/prosody tmp/web-load-test \
    prosody/config prosody/prosody-plugins-custom jicofo jvb; do
    make_dir "$jitsi_dir/config/$d" 0755 "$JITSI_UID:$JITSI_UID"
  done
  make_dir "$jitsi_dir/config" 0755 "$JITSI_UID:$JITSI_UID"
fi
# The answers last: a first run cut short leaves no site.env, so the next run
# is a first run again and writes what is missing (keeping a secret written).
put "$site" 0644 "$site_text"

# --- report --------------------------------------------------------------
if [ "${#changed[@]}" -gt 0 ]; then
  echo "Wrote:"
  printf '  %s\n' "${changed[@]}"
else
  echo "Nothing changed: every file already matches these answers."
fi
if [ "$jitsi_side" -eq 0 ]; then
  echo "Left out the Jitsi side: deploy/jitsi/.env is not in this copy. Its internal XMPP passwords"
  echo "are where setup.sh first wrote it and on the Jitsi VPS; a new one here would not match them."
  echo "To manage the Jitsi side from here, copy that .env into deploy/jitsi/ and run setup.sh again."
fi
if [ "$rotate" -eq 1 ]; then
  echo "New shared secret. 1. Copy deploy/turn/etc/secret to every relay (run setup.sh there again"
  echo "as root, or chgrp $TURND_GID it) and reload them: they now accept the new and the old one."
  echo "2. Then copy deploy/jitsi/.env to the Jitsi VPS and run docker compose up -d prosody there,"
  echo "between meetings: restarting prosody interrupts every meeting in progress (the relays accept"
  echo "both secrets meanwhile, so this can wait)."
  echo "3. TURN_TTL seconds after that restart, delete the old secret (second line of the relays'"
  echo "secret file) and reload the relays."
fi
if [ "$(id -u)" -ne 0 ]; then
  echo
  echo "Not run as root: the containers cannot read these files yet. On the relay VPS, run"
  echo "setup.sh again as root there (sudo deploy/setup.sh), or: sudo chgrp -R $TURND_GID deploy/turn/etc"
  echo "On the Jitsi VPS: sudo chown -R $JITSI_UID:$JITSI_UID deploy/jitsi/config"
fi

relay_rules=$("$turn_dir/ufw.sh" --print)
# Let's Encrypt sends the TLS-ALPN-01 challenge to TCP 443 only.
acme_port_note=
if [ "${val[TURNS_PORT]}" != 443 ]; then
  acme_port_note="
              NOTE: TURNS_PORT is ${val[TURNS_PORT]}, but Let's Encrypt validates the name on TCP 443
              only: unless TCP 443 of ${val[TURN_IP]} reaches turnd's port ${val[TURNS_PORT]}, use
              certificate files instead (\"Certificate files instead\" in deploy/turn/README.md)."
fi
jitsi_rules=$("$jitsi_dir/ufw.sh" --print)
cat <<EOF

DNS records to create (at your DNS provider; both before starting anything: the relay and the
site get their certificates from Let's Encrypt on their first start, under these names):
  ${val[MEET_DOMAIN]}.  A  ${val[MEET_IP]}   (Jitsi VPS)
  ${val[TURN_DOMAIN]}.  A  ${val[TURN_IP]}   (relay VPS)
$(for h in "${hosts[@]}"; do [ "$h" = "${val[TURN_DOMAIN]}" ] || echo "  $h.  A  <its relay's IP>   (another relay sharing the secret)"; done)

Firewall on the relay VPS (deploy/turn/ufw.sh applies these; mirror them in the provider's firewall):
$(sed 's/^/  /' <<<"$relay_rules")

Firewall on the Jitsi VPS (deploy/jitsi/ufw.sh applies these):
$(sed 's/^/  /' <<<"$jitsi_rules")
  and the videobridge must accept UDP ${val[TURN_IP]} -> ${val[MEET_IP]}:10000 (the relay forwards media there)

Next (deploy/README.md has the details; run these as root, from the checkout's top directory):
  relay VPS:  deploy/setup.sh     (again, on the relay itself: after a copy, gives deploy/turn/etc
                                   back to the container's group $TURND_GID; changes nothing else)
              ufw allow OpenSSH && deploy/turn/ufw.sh && ufw enable
              cd deploy/turn && docker compose up -d --build
              (turnd gets its certificate for ${val[TURN_DOMAIN]} from Let's Encrypt itself on this
               first start, once ${val[TURN_DOMAIN]} resolves to ${val[TURN_IP]} and TCP 443 is open:
               no certbot, no port 80. UDP and TCP serve at once, TLS once the certificate is there.
               Watch it: docker compose logs -f turnd, docker compose exec turnd turnctl status,
               curl -s 127.0.0.1:9641/readyz)${acme_port_note}
  anywhere:   turnctl check ${val[TURN_DOMAIN]} --secret-file deploy/turn/etc/secret
  Jitsi VPS:  copy deploy/jitsi/ (with .env, mode 0600) there, then:
              cd deploy/jitsi && ufw allow OpenSSH && ./ufw.sh && ufw enable
              chown -R $JITSI_UID:$JITSI_UID config && docker compose up -d
  Cal.com:    Jitsi app server URL https://${val[MEET_DOMAIN]} (no trailing slash)
EOF
