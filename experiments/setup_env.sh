#!/usr/bin/env bash
# Prepare this machine for prelar-jax: the rendering libraries MuJoCo needs (Debian/Ubuntu),
# a virtual environment at .venv (or $PRELAR_VENV) with the pinned requirements, and the package
# itself in editable mode. Safe to re-run: each part is skipped when already done.
#
#   bash experiments/setup_env.sh        # then: source .venv/bin/activate
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PRELAR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# 1. Python >= 3.10
command -v "$PYTHON" >/dev/null || die "no $PYTHON found; install Python 3.10 or newer (e.g. apt-get install python3 python3-venv)."
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "Python 3.10+ is required, found $("$PYTHON" --version 2>&1)."

# 2. Offscreen rendering libraries for MuJoCo (EGL through Mesa's software rasteriser).
have_lib() { ldconfig -p 2>/dev/null | grep -q "$1"; }
if ! have_lib 'libEGL.so.1' || ! have_lib 'libGL.so.1' || ! have_lib 'libEGL_mesa.so.0'; then
  PKGS="libegl1 libegl-mesa0 libgl1"
  if command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      die "MuJoCo needs the rendering libraries $PKGS. Install them as root: apt-get install -y $PKGS"; fi
    say "installing rendering libraries: $PKGS"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null || die "apt-get update failed; install $PKGS yourself, then re-run."
    $SUDO apt-get install -y -qq $PKGS >/dev/null || die "apt-get install $PKGS failed; install them yourself, then re-run."
  else
    die "MuJoCo needs EGL and GL libraries (Debian: $PKGS; or OSMesa: libosmesa6). Install them with your package manager, then re-run."
  fi
fi

# 3. Virtual environment with the pinned requirements (skipped when the pins are unchanged).
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create a virtual environment; on Debian install python3-venv."
fi
STAMP="$VENV/.prelar-requirements"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-test.txt" "$ROOT/setup.cfg" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! "$VENV/bin/python" -c 'import prelar_jax' 2>/dev/null; then
  LOG="$VENV/install.log"
  say "installing pinned requirements into $VENV (first time: a few minutes; log: $LOG)"
  { "$VENV/bin/python" -m pip install --upgrade pip \
      && "$VENV/bin/python" -m pip install -r "$ROOT/requirements-test.txt" \
      && "$VENV/bin/python" -m pip install --no-deps -e "$ROOT"; } > "$LOG" 2>&1 \
    || { tail -n 30 "$LOG" >&2; die "pip install failed (full log: $LOG). Check the network access to PyPI, then re-run."; }
  echo "$WANT" > "$STAMP"
fi

# 4. Optional CPU speed-ups (README "Performance"; without them everything runs, slower): oneDNN
#    convolutions (an extension built here from libdnnl-dev) and the tcmalloc allocator, which the
#    training scripts preload (PRELAR_MALLOC=system turns it off).
ONEDNN_DIR="$ROOT/prelar_jax/model/nets/onednn"
WANT_PKGS=""
[ -f /usr/include/oneapi/dnnl/dnnl.hpp ] || WANT_PKGS="libdnnl-dev g++"
ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || WANT_PKGS="$WANT_PKGS libtcmalloc-minimal4"
if [ -n "$WANT_PKGS" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  say "installing the optional CPU speed-ups:$WANT_PKGS"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $WANT_PKGS >/dev/null 2>&1 \
    || say "could not install$WANT_PKGS; the project runs without them (slower on CPU)"
fi
if [ ! -f "$ONEDNN_DIR/_prelar_onednn_conv.so" ] || [ "$ONEDNN_DIR/conv.cc" -nt "$ONEDNN_DIR/_prelar_onednn_conv.so" ]; then
  "$VENV/bin/python" -m prelar_jax.model.nets.onednn.build --quiet-missing \
    || say "WARNING: building the oneDNN convolution extension failed (see above); convolutions will run on XLA's kernels"
fi

# 5. Check that offscreen rendering really works (one clear error otherwise).
"$VENV/bin/python" -c 'from prelar_jax.envs.metaworld import check_rendering_backend as c; print("[setup] rendering backend:", c())' \
  || die "offscreen rendering does not work; see the message above."
say "ready: $VENV"
