#!/usr/bin/env bash
# One-shot GPU check (see benchmarks/gpu_check.py): on a machine with an NVIDIA GPU, PyTorch and Lightning, it
# installs this project's other packages from the wheels in benchmarks/wheels/ (no network needed), then prints
# the table. Run from anywhere; extra arguments go to gpu_check.py (--out, --batch-sizes, --skip-end-to-end ...).
#
#   bash benchmarks/gpu_check.sh --download-wheels   # once, on a machine with network: fill benchmarks/wheels/
#   bash benchmarks/gpu_check.sh                     # on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=benchmarks/wheels
# What the GPU image lacks; their own dependencies (transformers, timm, huggingface_hub, ...) are there.
PACKAGES=(diffusers==0.42.1 omegaconf==2.3.0 open_clip_torch ftfy wcwidth importlib_metadata)

if [[ "${1:-}" == "--download-wheels" ]]; then
    target=${TARGET_PYTHON:-3.12}
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$target" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${PACKAGES[@]}"
    "$PYTHON" -m pip wheel --quiet --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3  # no published wheel
    ls "$WHEELS"
    exit 0
fi

if ! "$PYTHON" -c "import diffusers, omegaconf, open_clip, ftfy" 2>/dev/null; then
    compgen -G "$WHEELS/*.whl" >/dev/null || {
        echo "error: diffusers, omegaconf, open_clip_torch or ftfy is missing and $WHEELS/ holds no wheels;" \
             "run 'bash benchmarks/gpu_check.sh --download-wheels' on a machine with network first." >&2
        exit 2
    }
    site=$(mktemp -d)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.gpu_check "$@"
