#!/usr/bin/env bash
# Set up the environment (idempotent, see setup.sh), build the default spec (render + NVRTC cubins into
# generated/hopper_k2/) and run it once against the float64 reference (on the GPU if there is one).
set -euo pipefail
# shellcheck source=scripts/setup.sh
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
swrgen_setup
cd "$SWRGEN_ROOT"
swrgen build specs/hopper_k2.yaml
swrgen demo specs/hopper_k2.yaml
