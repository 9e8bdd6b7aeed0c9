#!/usr/bin/env bash
# Install Xvfb and Qt's xcb libraries when missing (root + Debian/apt); otherwise say GUI tests will skip.
set -u
PKGS="xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libxkbcommon-x11-0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-image0 libgl1 libegl1 libfontconfig1 libdbus-1-3"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -z "$missing" ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "installing system packages for GUI tests:$missing"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
    || echo "WARNING: could not install$missing; GUI tests will be skipped"
else
  echo "WARNING: missing$missing and not root with apt-get; GUI tests will be skipped"
fi
