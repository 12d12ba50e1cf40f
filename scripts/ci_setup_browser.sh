#!/usr/bin/env bash
# What CI needs for the demo tests (tests/demo/), on Debian 12 (bookworm):
#   * chromium                  headless browser of tests/demo/test_demo_browser.py (driven by Playwright, never
#                               downloaded: the test points Playwright at /usr/bin/chromium)
#   * fonts-wqy-microhei        a CJK font so Chinese region names are drawn on the answer image (else numbers)
#   * mricron-data, invesalius-examples
#                               brain MRI + atlas and head CT for scripts/build_medreg_mini.py and its tests
#   * playwright (pip)          the Python driver only, in the `test` extra; no `playwright install` (no browser
#                               download)
# Usage: sudo scripts/ci_setup_browser.sh   (idempotent; returns at once when everything is installed)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PACKAGES=(chromium fonts-wqy-microhei mricron-data invesalius-examples)
if ! dpkg -s "${PACKAGES[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
fi
/usr/bin/chromium --version
