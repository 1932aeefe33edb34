#!/usr/bin/env bash
# Builds the lab's router daemon: Debian's miniupnpd 2.3.1 (UPnP IGD, NAT-PMP and
# PCP in one daemon, nftables backend) from Debian's source package, with one
# change: the TEST-NET ranges are taken out of `addr_is_reserved`'s table in
# getifaddr.c. Unchanged, it refuses a WAN address in 203.0.113.0/24 (the lab's
# "internet") and disables port forwarding; 2.3.1 has no option to allow it.
#
# Installs to $PREFIX (default /usr/local/lib/punch-lab/miniupnpd): the binary
# and its netfilter_nft/scripts (nft_init.sh makes its chains). Idempotent: an
# installed binary of the right version is kept. Needs root (apt-get).
set -euo pipefail

PREFIX="${PUNCH_LAB_MINIUPNPD:-/usr/local/lib/punch-lab/miniupnpd}"
VERSION="2.3.1"
# Marks an install with this patch (a different patch rebuilds).
STAMP=".built-$VERSION-testnet3"

if [ -x "$PREFIX/miniupnpd" ] && [ -f "$PREFIX/$STAMP" ]; then
  echo "miniupnpd $VERSION already built in $PREFIX"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# deb-src for bookworm main, in its own file (the machine's debian.sources is deb822).
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  cat > /etc/apt/sources.list.d/punch-lab-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq
fi
apt-get install -y -qq dpkg-dev pkg-config libnftnl-dev libmnl-dev libssl-dev uuid-dev nftables >/dev/null

WORK="$(mktemp -d /tmp/punch-lab-miniupnpd.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
apt-get source -qq --download-only "miniupnpd=$VERSION*" >/dev/null 2>&1 || apt-get source -qq --download-only miniupnpd >/dev/null
dpkg-source -x --no-check ./miniupnpd_*.dsc src >/dev/null
cd src
[ -f getifaddr.c ] || cd miniupnpd
grep -q "^$VERSION" VERSION || { echo "miniupnpd source is $(cat VERSION), want $VERSION" >&2; exit 1; }

# The reserved table lists each range as `{ IP(a, b, c, d), MSK(n) }, /* … */`.
# Drop the TEST-NET-3 line and check that it went.
grep -Eq 'IP\(203, *0, *113, *0\)' getifaddr.c || { echo "getifaddr.c: no TEST-NET-3 line to remove" >&2; exit 1; }
sed -i -E '/IP\(203, *0, *113, *0\)/d' getifaddr.c
if grep -Eq 'IP\(203, *0, *113, *0\)' getifaddr.c; then
  echo "getifaddr.c: the TEST-NET-3 line is still there" >&2
  exit 1
fi

./configure --igd2 --ipv6 --pcp-peer --portinuse --leasefile --firewall=nftables >/dev/null
make -s -f Makefile.linux_nft -j2 miniupnpd >"$WORK/make.log" 2>&1 || { tail -40 "$WORK/make.log" >&2; exit 1; }

mkdir -p "$PREFIX"
install -m 0755 miniupnpd "$PREFIX/miniupnpd"
cp -r netfilter_nft/scripts "$PREFIX/"
chmod 0755 "$PREFIX"/scripts/*.sh
rm -f "$PREFIX"/.built-*
touch "$PREFIX/$STAMP"
echo "miniupnpd $VERSION built into $PREFIX"
