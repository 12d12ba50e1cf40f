#!/usr/bin/env bash
# Sets up the project (CPU-only torch, test extras, the Debian packages the tests read real data and a browser from)
# and runs the whole test suite. This is the README's second command and what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: headless Chromium + a CJK font (browser test of the demo), real brain MRI/atlas and head-CT data
# (MedReg-mini builder and converter tests), a Java runtime (pycocoevalcap METEOR / PTB tokenizer), WordNet (compat
# METEOR).
# Best effort: without root or apt the dependent tests skip with a reason; everything else still runs.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  bash scripts/ci_setup_browser.sh >/dev/null 2>&1 || echo "warning: apt packages for the browser/real-data tests were not installed"
  command -v java >/dev/null 2>&1 || apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null 2>&1 || true
  # WordNet for NLTK's METEOR (--compat medrega): Debian's wordnet-base + wordnet-sense-index in NLTK's layout.
  # Not best effort: if it fails here, the METEOR tests (which run it again) fail with the script's message.
  bash scripts/setup_wordnet.sh >/dev/null || echo "warning: scripts/setup_wordnet.sh failed; the compat METEOR tests will fail"
fi

python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
# Real IU X-ray report texts for the metric smoke test (its own dependencies are not needed: --no-deps).
python3 -m pip install -q --no-deps "torchxrayvision==1.5.7" || echo "warning: torchxrayvision not installed; the IU X-ray smoke test will skip"
python3 -m pytest -q -n 2 tests "$@"
