#!/usr/bin/env bash
# Build lmms-eval's own venv once and cache it under the user cache dir:
#   ${XDG_CACHE_HOME:-~/.cache}/seechat/lmms-eval-0.7.3   (override: SEECHAT_LMMS_EVAL_VENV)
# lmms-eval talks to `seechat serve` over HTTP only (its `openai_compatible` model), so it needs
# nothing of seechat; its ~90 extra packages (wandb, scikit-learn, sentence-transformers, ...)
# stay out of seechat's .venv. Re-running is free once the venv is complete (a stamp file is
# written last). Prints the venv path.
set -euo pipefail
VERSION=0.7.3
VENV=${SEECHAT_LMMS_EVAL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/seechat/lmms-eval-$VERSION}
PYTHON=${PYTHON:-python3.11}
STAMP="$VENV/.seechat-complete"
if [ -f "$STAMP" ]; then echo "$VENV"; exit 0; fi
start=$(date +%s)
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >&2
# filelock<4: lmms-eval 0.7.3 patches filelock._api, a module filelock 4 no longer has
"${PIP[@]}" install "lmms-eval==$VERSION" "filelock<4" >&2
"$VENV/bin/python" -c "import lmms_eval, importlib.metadata as m; print('lmms-eval', m.version('lmms-eval'))" >&2
echo "built in $(( $(date +%s) - start )) s" >&2
touch "$STAMP"
echo "$VENV"
