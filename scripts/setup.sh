#!/usr/bin/env bash
# Set-up for `make demo` / `make test` on a fresh machine: system data, the venv, the project.
# Idempotent; the Makefile re-runs it only when pyproject.toml or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv

# 1. System data the bundled lake is built from (Debian packages).
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages ${need[*]}" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null
  else
    echo "setup: missing Debian packages ${need[*]}; run: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi

# 2. The venv. torch goes first and pinned: the CPU wheel on disk, never a CUDA build.
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch, probex; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { echo "setup: install failed (see pip output above)" >&2; exit 1; }
touch "$VENV/.probex-installed"
