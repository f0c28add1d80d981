# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/demo.sh (not run on its own):
#
#   . scripts/setup.sh && swrgen_setup
#
# Creates the virtual environment .venv (or $SWRGEN_VENV) if missing, installs torch first (the CPU build
# whose wheel lies on this machine's disk: pip must never fall back to a multi-GB CUDA build from the
# registry), then swrgen itself, editable, with its test extras and the `hf` extra (transformers, for
# tests/test_models.py: about 20 s more on a first install; it pulls no torch). Idempotent: a stamp in the
# venv records what was installed for which pyproject.toml, so a second run only checks and returns at once. Every step
# returns non-zero on failure (also where the caller's `set -e` does not apply, as in `swrgen_setup && ...`).

SWRGEN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SWRGEN_VENV="${SWRGEN_VENV:-$SWRGEN_ROOT/.venv}"
SWRGEN_TORCH_VERSION="2.13.0"

swrgen_setup() {
  if [ ! -x "$SWRGEN_VENV/bin/python" ]; then
    echo "setup: creating $SWRGEN_VENV"
    python3 -m venv "$SWRGEN_VENV" || return 1
  fi
  # shellcheck disable=SC1091
  . "$SWRGEN_VENV/bin/activate" || return 1

  local stamp="$SWRGEN_VENV/.swrgen-setup" want
  # the version lives in swrgen/__init__.py (pyproject.toml reads it): a new one needs new package metadata
  want="torch==$SWRGEN_TORCH_VERSION $(sha256sum "$SWRGEN_ROOT/pyproject.toml" | cut -d' ' -f1)"
  want="$want $(grep -m1 '^_VERSION' "$SWRGEN_ROOT/swrgen/__init__.py" || true) $SWRGEN_ROOT"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
    python -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('swrgen', 'swrgen.templates', 'torch', 'pytest', 'build', 'click',
                                             'jinja2', 'yaml', 'cuda.bindings', 'transformers')))" \
      2>/dev/null; then
    return 0
  fi

  if ! python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$SWRGEN_TORCH_VERSION')" \
    2>/dev/null; then
    echo "setup: installing torch==$SWRGEN_TORCH_VERSION (CPU build, from the wheel on local disk)"
    local find_links=()
    [ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
    # --no-index: only a local wheel may satisfy this; if there is none, stop here rather than download a
    # CUDA build of several GB from the registry.
    if ! python -m pip install --no-index --no-deps "${find_links[@]}" "torch==$SWRGEN_TORCH_VERSION"; then
      echo "setup: no local wheel for torch==$SWRGEN_TORCH_VERSION (pip find-links, e.g. /opt/wheels);" \
        "install a CPU build of torch into $SWRGEN_VENV first" >&2
      return 1
    fi
    python -m pip install "torch==$SWRGEN_TORCH_VERSION" || return 1 # torch's own (small) dependencies
  fi
  echo "setup: installing swrgen (editable) with its test and hf extras"
  python -m pip install -e "$SWRGEN_ROOT[test,hf]" || return 1
  python -c "import torch; print(f'setup: torch {torch.__version__} (CUDA build: {torch.version.cuda})')" || return 1
  echo "$want" >"$stamp"
}
