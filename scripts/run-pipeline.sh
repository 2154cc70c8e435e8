#!/usr/bin/env bash
# The main job: sets up what it needs (see setup.sh), then reproduces the whole DVC pipeline on the
# profile in params.yaml. Extra arguments go to `dvc repro` (e.g. a stage name, or --force).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl} PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
source .venv/bin/activate  # stage commands run `python` from the project's environment
exec dvc repro "$@"
