#!/usr/bin/env bash
# What CI needs for the demo tests (tests/demo/), on Debian 12 (bookworm):
#   * chromium                  headless browser of tests/demo/test_demo_browser.py (driven by Playwright, never
#                               downloaded: the test points Playwright at /usr/bin/chromium)
#   * fonts-wqy-microhei        a CJK font so Chinese region names are drawn on the answer image (else numbers)
#   * mricron-data, invesalius-examples
#                               brain MRI + atlas and head CT for scripts/build_medreg_mini.py and its tests
#   * playwright (pip)          the Python driver only; no `playwright install` (no browser download)
# Usage: sudo scripts/ci_setup_browser.sh   (idempotent)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-wqy-microhei mricron-data invesalius-examples
python3 -m pip install -q "playwright>=1.45"
/usr/bin/chromium --version
python3 -c "import playwright; print('playwright driver ok')"
