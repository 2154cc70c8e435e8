#!/usr/bin/env bash
# Sets up everything RSD needs on a fresh Debian/Ubuntu machine: the system libraries for headless
# MuJoCo rendering, a virtual environment in .venv, and the pinned Python packages.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*"; }

# 1. System libraries for offscreen rendering on the CPU (EGL through Mesa's llvmpipe).
if ! ldconfig -p | grep -q 'libEGL_mesa.so'; then
  log "installing EGL/Mesa libraries"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libglvnd0 >/dev/null
fi

# 2. Virtual environment.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi

# 3. Packages. torch first, alone, so that a CPU wheel already on the machine is taken
#    instead of a multi-GB CUDA build pulled in by another package's requirement.
stamp=.venv/.rsd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing packages (a few minutes on first run)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
log "ready: $(.venv/bin/python -c 'import torch, mujoco, libero; print(f"torch {torch.__version__}, mujoco {mujoco.__version__}")')"
