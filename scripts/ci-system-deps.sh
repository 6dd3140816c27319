#!/usr/bin/env bash
# System packages the multi-node tests need (tests/spark): OpenSSH server and client, iproute2
# (ip netns, veth, bridge), rsync and nftables (the firewall test). Idempotent: does nothing when they are all present.
# Run as root on Debian/Ubuntu; elsewhere it says what is missing and leaves it to you.
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
[ -x /usr/sbin/nft ] || need+=(nftables)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[ci-system-deps] missing ${need[*]}: install them (multinode tests will fail without)" >&2
  exit 0
fi
echo "[ci-system-deps] installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
