#!/usr/bin/env bash
# The test suite: sets up what it needs (see setup.sh), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
exec .venv/bin/python -m pytest "$@"
