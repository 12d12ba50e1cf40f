#!/usr/bin/env bash
# Sets up the project (CPU-only torch) and runs the test suite. This is the README's second command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q -n 2 tests "$@"
