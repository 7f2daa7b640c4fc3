#!/usr/bin/env bash
# Checks the packages built by scripts/package: installs the .deb on this
# machine (dpkg; needs root), checks files, owners and modes, validates the
# shipped config and unit, checks an upgrade keeps an edited config, removes
# and purges cleanly; lists and checks the .rpm; checks the Lambda zip.
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
check "deb lists /etc/spotguard/agent.toml as a conffile" sh -c "dpkg-deb -e '$deb' /tmp/spotguard-deb-control && grep -qx /etc/spotguard/agent.toml /tmp/spotguard-deb-control/conffiles"
dpkg -r spotguard-agent >/dev/null 2>&1; dpkg -P spotguard-agent >/dev/null 2>&1
check "dpkg -i" dpkg -i "$deb"
expect_mode /usr/bin/spotguard-agent "755 root:root"
expect_mode /usr/bin/spotguard-imds-mock "755 root:root"
expect_mode /etc/spotguard/agent.toml "640 root:root"
unit=$(dpkg -L spotguard-agent | grep 'systemd/system/spotguard-agent.service$' | head -n1)
expect_mode "$unit" "644 root:root"
check "README shipped" test -f /usr/share/doc/spotguard-agent/README.md
check "copyright shipped" test -f /usr/share/doc/spotguard-agent/copyright
check "check-config accepts the shipped default" /usr/bin/spotguard-agent check-config --config /etc/spotguard/agent.toml
check "systemd-analyze verify" systemd-analyze verify "$unit"
echo "   $(systemd-analyze security --offline=yes "$unit" 2>/dev/null | tail -n1)"
check "not enabled by the install" sh -c "! ls /etc/systemd/system/multi-user.target.wants/spotguard-agent.service"
# An upgrade (reinstall) keeps the user's edits.
sed -i 's/^concurrency = 1$/concurrency = 3/' /etc/spotguard/agent.toml
check "reinstall" dpkg -i --force-confold "$deb"
check "edited config kept" grep -q '^concurrency = 3$' /etc/spotguard/agent.toml
check "dpkg -r" dpkg -r spotguard-agent
check "binaries gone" sh -c "! test -e /usr/bin/spotguard-agent"
check "config kept after remove" test -f /etc/spotguard/agent.toml
check "dpkg -P" dpkg -P spotguard-agent
check "config gone after purge" sh -c "! test -e /etc/spotguard/agent.toml"

echo "== $rpm"
rpm -qlp --dump "$rpm" 2>/dev/null | awk '{print $1, $5, $6, $7}'
check "rpm payload is gzip (Amazon Linux 2 reads it)" sh -c "[ \"\$(rpm -qp --qf '%{PAYLOADCOMPRESSOR}' '$rpm' 2>/dev/null)\" = gzip ]"
check "rpm marks agent.toml as config" sh -c "rpm -qcp '$rpm' 2>/dev/null | grep -qx /etc/spotguard/agent.toml"
check "rpm ships the binaries 0755" sh -c "rpm -qlp --dump '$rpm' 2>/dev/null | grep -q '^/usr/bin/spotguard-agent .* 0100755 '"
check "rpm ships the unit" sh -c "rpm -qlp '$rpm' 2>/dev/null | grep -qx /usr/lib/systemd/system/spotguard-agent.service"

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
