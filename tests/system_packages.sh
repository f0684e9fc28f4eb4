#!/usr/bin/env bash
# The system packages the tests need, one line each in the list below: the Debian package, then a shell test that
# succeeds when it is installed. Prints nothing when every test succeeds. Otherwise, as root on Debian, runs
# `apt-get update` once and `apt-get install -y` with the missing packages; anywhere else it stops, naming the command.
set -euo pipefail
PACKAGES='
chromium                  command -v chromium
postgresql                compgen -G "/usr/lib/postgresql/*/bin/initdb"
openjdk-17-jre-headless   compgen -G "/usr/lib/jvm/java-17-openjdk-*/bin/java"
'

missing() {
  while read -r package check; do
    [ -z "$package" ] && continue
    bash -c "$check" >/dev/null 2>&1 || echo "$package"
  done <<< "$PACKAGES"
}

todo=$(missing | xargs)
[ -z "$todo" ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing system packages for the tests: $todo"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq $todo >/dev/null
  still=$(missing | xargs)
  [ -z "$still" ] || { echo "still missing after apt-get install: $still" >&2; exit 1; }
  exit 0
fi
sudo=$([ "$(id -u)" -eq 0 ] || echo "sudo ")
echo "The tests need system package(s) that are missing: $todo" >&2
echo "Run: ${sudo}apt-get update && ${sudo}apt-get install -y $todo   (Debian; elsewhere install the equivalent)" >&2
exit 1
