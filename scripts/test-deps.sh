#!/usr/bin/env bash
# What the test suite needs beyond `pip install -e ".[test]"`: Debian's chromium, the browser the
# web page's Playwright test drives (Playwright's own browser download is never used: it needs its
# CDN, and machines here reach only package registries). Idempotent; a no-op once it is installed.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "scripts/test-deps.sh: /usr/bin/chromium is missing and installing it needs root;" \
            "run: sudo apt-get install -y chromium" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q chromium
