#!/bin/sh
# certbot deploy hook: hand the relay's certificate to turnd.
#
# certbot keeps its private keys readable by root only, while turnd runs as an
# unprivileged user. On every issue and renewal, certbot runs this hook with
# RENEWED_LINEAGE=/etc/letsencrypt/live/<name>; it copies fullchain.pem and
# privkey.pem into TURND_TLS_DIR (default /etc/turnd/tls), readable by one
# group: the container's group 65532 (Docker route) or ssl-cert (systemd
# route, see deploy/systemd/turnd.service). turnd picks up the new files
# within 5 s; no restart, calls continue.
#
# Install once (certbot stores the hook with the certificate's renewal settings):
#   certbot certonly --standalone -d turn.example.com -m you@example.com --agree-tos \
#     --deploy-hook /path/to/deploy/turn/certbot-deploy-hook.sh
# The group is taken from TURND_TLS_DIR when it exists, else from
# TURND_TLS_GROUP (default 65532): for the systemd route run the first issue as
#   TURND_TLS_GROUP=ssl-cert certbot certonly ...
set -eu

: "${RENEWED_LINEAGE:?is not set: this script is run by certbot as a --deploy-hook}"
dir=${TURND_TLS_DIR:-/etc/turnd/tls}

if [ -d "$dir" ]; then
  group=$(stat -c %g "$dir")
else
  group=${TURND_TLS_GROUP:-65532}
  install -d -m 0750 -o root -g "$group" "$dir"
fi

# Write next to the target, then rename: turnd never reads a half-written file.
install -m 0644 -o root -g "$group" "$RENEWED_LINEAGE/fullchain.pem" "$dir/.fullchain.pem.new"
install -m 0640 -o root -g "$group" "$RENEWED_LINEAGE/privkey.pem" "$dir/.privkey.pem.new"
mv -f "$dir/.privkey.pem.new" "$dir/privkey.pem"
mv -f "$dir/.fullchain.pem.new" "$dir/fullchain.pem"
echo "turnd: installed the certificate of $RENEWED_LINEAGE in $dir (group $group)"
