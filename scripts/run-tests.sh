#!/usr/bin/env bash
# The test suite: sets up what it needs (see setup.sh), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Headless Chromium, for the test that checks offline plots are drawn.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  echo "[setup] installing chromium (headless plot check)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
export MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
exec .venv/bin/python -m pytest "$@"
