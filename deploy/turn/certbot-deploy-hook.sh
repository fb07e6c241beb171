#!/bin/sh
# certbot deploy hook: hand the relay's certificate to turnd.
#
# Only for a relay that reads certificate files ([tls] cert and key) instead
# of getting its certificate by ACME itself ([tls.acme], the default of
# deploy/turn/turnd.toml.template): a wildcard certificate through certbot's
# DNS-01 challenge, for example.
#
# certbot keeps its private keys readable by root only, while turnd runs as an
# unprivileged user. On every issue and renewal, certbot runs this hook with
# RENEWED_LINEAGE=/etc/letsencrypt/live/<name>; it copies fullchain.pem and
# privkey.pem into TURND_TLS_DIR (default /etc/turnd/tls), owned by root and
# readable by one group: the container's group 65532 (Docker route), ssl-cert
# (systemd unit from deploy/systemd) or turnd (Debian package). turnd picks up
# the new files within 5 s; no restart, calls continue.
#
# Install once (certbot stores the hook with the certificate's renewal
# settings), e.g. with the DNS plugin for your provider (Debian packages
# python3-certbot-dns-*; here Cloudflare's):
#   certbot certonly --dns-cloudflare --dns-cloudflare-credentials /root/cloudflare.ini \
#     -d turn.example.com -m you@example.com --agree-tos \
#     --deploy-hook /path/to/deploy/turn/certbot-deploy-hook.sh
#
# The group: TURND_TLS_GROUP when set; else the group of an existing
# TURND_TLS_DIR unless that is root (Docker creates a missing bind-mount source
# as root:root, which must not lock turnd out); else 65532. For the systemd
# route run the first issue as `TURND_TLS_GROUP=ssl-cert certbot certonly ...`
# (Debian package: TURND_TLS_GROUP=turnd); renewals keep that group.
set -eu

: "${RENEWED_LINEAGE:?is not set: this script is run by certbot as a --deploy-hook}"
dir=${TURND_TLS_DIR:-/etc/turnd/tls}

if [ -n "${TURND_TLS_GROUP:-}" ]; then
  group=$TURND_TLS_GROUP
elif [ -d "$dir" ] && [ "$(stat -c %g "$dir")" != 0 ]; then
  group=$(stat -c %g "$dir")
else
  group=65532
fi
# The directory itself: root-owned, searchable by the group (whoever made it).
install -d -m 0750 -o root -g "$group" "$dir"
chown root:"$group" "$dir"
chmod 0750 "$dir"

# Write next to the target, then rename: turnd never reads a half-written file.
install -m 0644 -o root -g "$group" "$RENEWED_LINEAGE/fullchain.pem" "$dir/.fullchain.pem.new"
install -m 0640 -o root -g "$group" "$RENEWED_LINEAGE/privkey.pem" "$dir/.privkey.pem.new"
mv -f "$dir/.privkey.pem.new" "$dir/privkey.pem"
mv -f "$dir/.fullchain.pem.new" "$dir/fullchain.pem"
echo "turnd: installed the certificate of $RENEWED_LINEAGE in $dir (group $group)"
