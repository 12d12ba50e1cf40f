#!/usr/bin/env bash
# The README's second command and what .ci/run runs: sets the project up in its own virtual environment `.venv/`
# (CPU torch 2.13.0, the package with its `test` extra under constraints.txt, the Debian packages some tests read)
# and runs the whole test suite in it, so a package installed by hand elsewhere can never hide a missing install step.
#
#   bash scripts/test.sh                                   # everything, 2 workers, fixed order
#   bash scripts/test.sh tests/data -x                     # arguments go to pytest (default: pytest.ini's tests)
#   MEDREGA_RANDOM_ORDER=1234 bash scripts/test.sh         # random order (pytest-randomly) with seed 1234;
#   MEDREGA_RANDOM_ORDER=random bash scripts/test.sh       # ... or a fresh seed (printed in pytest's header)
#
# `.venv/` is rebuilt from scratch when setup.py, requirements.txt, constraints.txt or this script change (their hash
# is stored in .venv/medrega-deps.sha256 once an install has succeeded); otherwise nothing is reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/medrega-deps.sha256"
PYTHON="${PYTHON:-python3}"

# System packages: headless Chromium + a CJK font (browser test of the demo), real brain MRI/atlas and head-CT data
# (MedReg-mini builder and converter tests), a Java runtime (pycocoevalcap METEOR / PTB tokenizer), WordNet (compat
# METEOR).
# Best effort: without root or apt the dependent tests skip with a reason; everything else still runs.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  bash scripts/ci_setup_browser.sh >/dev/null 2>&1 || echo "warning: apt packages for the browser/real-data tests were not installed"
  command -v java >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
    default-jre-headless; } >/dev/null 2>&1 || echo "warning: java not installed; the METEOR/PTB tests will skip"
  # WordNet for NLTK's METEOR (--compat medrega): Debian's wordnet-base + wordnet-sense-index in NLTK's layout.
  # Not best effort: if it fails here, the METEOR tests (which run it again) fail with the script's message.
  bash scripts/setup_wordnet.sh >/dev/null || echo "warning: scripts/setup_wordnet.sh failed; the compat METEOR tests will fail"
fi

deps_hash() { cat setup.py requirements.txt constraints.txt scripts/test.sh | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$(deps_hash)" ]; then
  echo "scripts/test.sh: building $VENV (dependencies changed or first run)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  log="$VENV/install.log"  # pip's output goes here; its tail is shown when a step fails
  pip_install() { "$VENV/bin/python" -m pip install -q "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; return 1; }; }
  pip_install "torch==2.13.0"  # the CPU build on this disk; a bare `torch` would pull a CUDA build of several GB
  pip_install -e ".[test]" -c constraints.txt
  # Real IU X-ray report texts for the metric smoke test (its own dependencies are not needed: --no-deps).
  pip_install --no-deps "torchxrayvision==1.5.7" \
    || echo "warning: torchxrayvision not installed; the IU X-ray smoke test will skip"
  deps_hash > "$STAMP"
fi

order=()  # pytest.ini turns pytest-randomly off (-p no:randomly) so CI's order is stable
if [ -n "${MEDREGA_RANDOM_ORDER:-}" ]; then
  order=(-p randomly)
  [ "$MEDREGA_RANDOM_ORDER" = random ] || order+=("--randomly-seed=$MEDREGA_RANDOM_ORDER")
fi

# the venv's console scripts and torchrun come first on PATH, as after `source .venv/bin/activate`
export PATH="$PWD/$VENV/bin:$PATH" VIRTUAL_ENV="$PWD/$VENV"
status=0
# --dist loadgroup: tests marked xdist_group (shared expensive module fixtures) stay in one worker
"$VENV/bin/python" -m pytest -q -n 2 --dist loadgroup "${order[@]}" "$@" || status=$?
[ "$status" -ne 5 ] || echo "scripts/test.sh: pytest collected no tests (exit 5): that is a failure" >&2
exit "$status"
