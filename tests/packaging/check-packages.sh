#!/usr/bin/env bash
# Checks the packages built by scripts/package: installs the .deb on this
# machine (dpkg; needs root), checks files, owners and modes, the users it
# creates (spotguard, spotguard-job) and who may read agent.toml, validates
# the shipped config, unit and IMDS guard, checks an upgrade keeps an edited
# config, removes and purges cleanly (users included); lists and checks the
# .rpm (files, requires, scripts); checks the Lambda zip. The mock IMDS is a
# development tool: neither package may ship it.
# Prints "N passed, M failed" and exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
dist=target/dist
pass=0; fail=0
ok()   { pass=$((pass + 1)); echo "ok   $*"; }
bad()  { fail=$((fail + 1)); echo "FAIL $*"; }
check() { local what=$1; shift; if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi; }
mode_owner() { stat -c '%a %U:%G' "$1" 2>/dev/null; }
expect_mode() { local got; got=$(mode_owner "$1"); if [ "$got" = "$2" ]; then ok "$1 is $2"; else bad "$1 is '$got', expected $2"; fi; }

deb=$(ls $dist/spotguard-agent_*_amd64.deb | head -n1)
rpm=$(ls $dist/spotguard-agent-*.x86_64.rpm | head -n1)
echo "== $deb"
dpkg-deb -c "$deb"
ctl=/tmp/spotguard-deb-control
rm -rf "$ctl"
check "deb lists /etc/spotguard/agent.toml as a conffile" sh -c "dpkg-deb -e '$deb' $ctl && grep -qx /etc/spotguard/agent.toml $ctl/conffiles"
check "deb ships no mock IMDS (a development tool)" sh -c "! dpkg-deb -c '$deb' | grep -q spotguard-imds-mock"
check "deb ships the IMDS guard" sh -c "dpkg-deb -c '$deb' | grep -q ' ./usr/share/spotguard/imds-guard.nft$'"
check "deb depends on nftables" sh -c "dpkg-deb -f '$deb' Depends | tr ',' '\n' | grep -Eqx ' *nftables( .*)?'"
check "deb postinst creates both users" sh -c "grep -q 'useradd --system --gid spotguard-job' $ctl/postinst && grep -q 'useradd --system --gid spotguard ' $ctl/postinst && grep -q 'usermod -a -G spotguard-job spotguard' $ctl/postinst"
check "deb postinst makes agent.toml root:spotguard" grep -q 'chown root:spotguard /etc/spotguard/agent.toml' "$ctl/postinst"
check "deb postinst and postrm hold cargo-deb's systemd code (#DEBHELPER# replaced)" sh -c "grep -q deb-systemd-helper $ctl/postinst && grep -q deb-systemd-helper $ctl/postrm && ! grep -q '#DEBHELPER#' $ctl/postinst $ctl/postrm"
check "deb postrm removes the users on purge" grep -q 'userdel' "$ctl/postrm"
dpkg -r spotguard-agent >/dev/null 2>&1; dpkg -P spotguard-agent >/dev/null 2>&1
# The package depends on nftables (the unit loads the IMDS guard with nft).
dpkg -s nftables >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null; }
check "dpkg -i" dpkg -i "$deb"
expect_mode /usr/bin/spotguard-agent "755 root:root"
check "the mock IMDS is not installed" sh -c "! test -e /usr/bin/spotguard-imds-mock"
check "user spotguard (the agent): system user, no login shell" sh -c "getent passwd spotguard | grep -q ':/nonexistent:/usr/sbin/nologin$'"
check "user spotguard-job (the jobs): system user, no login shell" sh -c "getent passwd spotguard-job | grep -q ':/nonexistent:/usr/sbin/nologin$'"
check "spotguard is a member of group spotguard-job" sh -c "id -nG spotguard | tr ' ' '\n' | grep -qx spotguard-job"
check "spotguard-job is in none of the agent's groups" sh -c "[ \"\$(id -nG spotguard-job)\" = spotguard-job ]"
expect_mode /etc/spotguard/agent.toml "640 root:spotguard"
check "the agent's user reads agent.toml" setpriv --reuid=spotguard --regid=spotguard --init-groups cat /etc/spotguard/agent.toml
check "the job user cannot read agent.toml" sh -c "! setpriv --reuid=spotguard-job --regid=spotguard-job --init-groups cat /etc/spotguard/agent.toml"
expect_mode /usr/share/spotguard/imds-guard.nft "644 root:root"
check "nft accepts the IMDS guard (check mode: nothing is loaded)" nft -c -f /usr/share/spotguard/imds-guard.nft
unit=$(dpkg -L spotguard-agent | grep 'systemd/system/spotguard-agent.service$' | head -n1)
expect_mode "$unit" "644 root:root"
check "README shipped" test -f /usr/share/doc/spotguard-agent/README.md
check "copyright shipped" test -f /usr/share/doc/spotguard-agent/copyright
check "check-config accepts the shipped default" /usr/bin/spotguard-agent check-config --config /etc/spotguard/agent.toml
check "systemd-analyze verify" systemd-analyze verify "$unit"
# The unit's SupplementaryGroups: a group that does not exist stops the
# start (the GPU check's journalctl -k reads the journal through it).
check "group systemd-journal exists (the unit's SupplementaryGroups)" getent group systemd-journal
echo "   $(systemd-analyze security --offline=yes "$unit" 2>/dev/null | tail -n1)"
check "not enabled by the install" sh -c "! ls /etc/systemd/system/multi-user.target.wants/spotguard-agent.service"
# An upgrade (reinstall) keeps the user's edits.
sed -i 's/^concurrency = 1$/concurrency = 3/' /etc/spotguard/agent.toml
check "reinstall" dpkg -i --force-confold "$deb"
check "edited config kept" grep -q '^concurrency = 3$' /etc/spotguard/agent.toml
expect_mode /etc/spotguard/agent.toml "640 root:spotguard"
check "dpkg -r" dpkg -r spotguard-agent
check "binaries gone" sh -c "! test -e /usr/bin/spotguard-agent"
check "config kept after remove" test -f /etc/spotguard/agent.toml
check "dpkg -P" dpkg -P spotguard-agent
check "config gone after purge" sh -c "! test -e /etc/spotguard/agent.toml"
check "users gone after purge" sh -c "! getent passwd spotguard && ! getent passwd spotguard-job"

echo "== $rpm"
rpm -qlp --dump "$rpm" 2>/dev/null | awk '{print $1, $5, $6, $7}'
check "rpm payload is gzip (Amazon Linux 2 reads it)" sh -c "[ \"\$(rpm -qp --qf '%{PAYLOADCOMPRESSOR}' '$rpm' 2>/dev/null)\" = gzip ]"
check "rpm marks agent.toml as config" sh -c "rpm -qcp '$rpm' 2>/dev/null | grep -qx /etc/spotguard/agent.toml"
check "rpm ships the binaries 0755" sh -c "rpm -qlp --dump '$rpm' 2>/dev/null | grep -q '^/usr/bin/spotguard-agent .* 0100755 '"
check "rpm ships the unit" sh -c "rpm -qlp '$rpm' 2>/dev/null | grep -qx /usr/lib/systemd/system/spotguard-agent.service"
check "rpm ships no mock IMDS (a development tool)" sh -c "! rpm -qlp '$rpm' 2>/dev/null | grep -q spotguard-imds-mock"
check "rpm ships the IMDS guard" sh -c "rpm -qlp '$rpm' 2>/dev/null | grep -qx /usr/share/spotguard/imds-guard.nft"
check "rpm requires nftables" sh -c "rpm -qp --requires '$rpm' 2>/dev/null | grep -Eq '^nftables( |$)'"
rpm -qp --scripts "$rpm" 2>/dev/null > /tmp/spotguard-rpm-scripts
check "rpm creates both users before its files (preinstall)" sh -c "sed -n '/^preinstall scriptlet/,/^postinstall scriptlet/p' /tmp/spotguard-rpm-scripts | grep -q 'useradd --system --gid spotguard-job' && sed -n '/^preinstall scriptlet/,/^postinstall scriptlet/p' /tmp/spotguard-rpm-scripts | grep -q 'usermod -a -G spotguard-job spotguard'"
check "rpm makes agent.toml root:spotguard (postinstall)" sh -c "sed -n '/^postinstall scriptlet/,\$p' /tmp/spotguard-rpm-scripts | grep -q 'chown root:spotguard /etc/spotguard/agent.toml'"

echo "== aarch64"
armdeb=$(ls $dist/spotguard-agent_*_arm64.deb 2>/dev/null | head -n1)
armrpm=$(ls $dist/spotguard-agent-*.aarch64.rpm 2>/dev/null | head -n1)
if [ -n "$armdeb" ] && [ -n "$armrpm" ]; then
  rm -rf /tmp/spotguard-armdeb && mkdir -p /tmp/spotguard-armdeb && dpkg-deb -x "$armdeb" /tmp/spotguard-armdeb
  check "arm64 deb holds aarch64 binaries" sh -c "file /tmp/spotguard-armdeb/usr/bin/spotguard-agent | grep -q 'ARM aarch64'"
  check "aarch64 rpm is aarch64" sh -c "[ \"\$(rpm -qp --qf '%{ARCH}' '$armrpm' 2>/dev/null)\" = aarch64 ]"
  check "aarch64 rpm payload is gzip" sh -c "[ \"\$(rpm -qp --qf '%{PAYLOADCOMPRESSOR}' '$armrpm' 2>/dev/null)\" = gzip ]"
else
  bad "aarch64 packages missing"
fi

echo "== $dist/spotguard-controller-lambda.zip"
unzip -Z "$dist/spotguard-controller-lambda.zip"
check "zip holds an executable bootstrap" sh -c "unzip -Z '$dist/spotguard-controller-lambda.zip' | grep -q '^-rwx.* bootstrap$'"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
