#!/usr/bin/env bash
# Set up the environment (idempotent, see setup.sh) and run the whole test suite:
#
#   bash scripts/test.sh              # python -m pytest -q
#   bash scripts/test.sh -k cache -x  # extra arguments go to pytest
#
# pytest's exit code is this script's (5 = no tests collected is a failure, not a success).
set -euo pipefail
# shellcheck source=scripts/setup.sh
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
swrgen_setup
cd "$SWRGEN_ROOT"
exec python -m pytest -q "$@"
