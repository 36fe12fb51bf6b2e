#!/usr/bin/env bash
# The machine as a cluster host for the launcher tests (tests/test_launcher.py), as root:
#  - an OpenSSH server on 127.0.0.1:22, rsync and sudo (what Ray's cluster launcher uses on a node);
#  - `nodekd`, the loopback nodes' SSH user, with passwordless sudo as the rayproject images' user has;
#  - uid 1000 / gid 100, the rayproject images' user (`ray`), with passwordless sudo, for the replay of
#    the container's setup. A machine that already has a uid 1000 keeps it and its name.
# Idempotent: a second run changes nothing and leaves a running sshd alone.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync >/dev/null || missing+=(rsync)
command -v sudo >/dev/null || missing+=(sudo)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
getent group 100 >/dev/null || groupadd -g 100 users
id nodekd >/dev/null 2>&1 || useradd -m -s /bin/bash -g 100 nodekd
usermod -p '*' nodekd                      # no password, not locked: key logins only
getent passwd 1000 >/dev/null || useradd -m -u 1000 -g 100 -s /bin/bash ray
uid1000=$(getent passwd 1000 | cut -d: -f1)
printf '%s ALL=(ALL) NOPASSWD: ALL\n%s ALL=(ALL) NOPASSWD: ALL\n' nodekd "$uid1000" > /etc/sudoers.d/nodekd-tests
chmod 440 /etc/sudoers.d/nodekd-tests
mkdir -p /run/sshd
ssh-keygen -A >/dev/null
if ! (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null; then
  /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o PasswordAuthentication=no -o MaxStartups=50:30:100
fi
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null && break; sleep 0.1; done
(exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null || { echo "cluster-host: sshd does not answer on 127.0.0.1:22" >&2; exit 1; }
echo "cluster host ready: sshd on 127.0.0.1:22, node user nodekd, image user $uid1000 (uid 1000)"
