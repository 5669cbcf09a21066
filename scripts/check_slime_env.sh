#!/usr/bin/env bash
# Install the plugin into an environment pinned like slime's image and prove it changes nothing.
#
# slime's image is built on SGLang 0.5.15.post1 (which requires transformers==5.12.1 and
# torch==2.11.0) and its Dockerfile pins numpy==1.26.4 and scipy==1.17.1. This script:
#   1. creates a fresh venv with those pins installed first (torch: the CPU wheel nearest to 2.11
#      that this machine offers, TORCH_VERSION below),
#   2. runs `pip install -e .` (the plugin alone, no extras) and fails if any version installed
#      in step 1 changed or `pip check` complains,
#   3. adds the test tools (and, for the local backend's tests, matplotlib and a pyarrow that
#      imports with numpy 1.26, as slime's `datasets` needs one), keeping the pins, and runs the
#      plugin's tests: models, rollout, integration, envs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${SLIME_VENV:-.venv-slime}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SLIME_PINS=(transformers==5.12.1 numpy==1.26.4 scipy==1.17.1)
# The newest pyarrow whose wheels still accept numpy 1.x (pyarrow 23 and later require numpy 2).
PYARROW_FOR_NUMPY1=${PYARROW_FOR_NUMPY1:-pyarrow<23}

step() { printf '\n== %s\n' "$*"; }

step "fresh venv $VENV with slime's pins: torch==$TORCH_VERSION ${SLIME_PINS[*]}"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip
"${PIP[@]}" install --quiet "torch==$TORCH_VERSION"
"${PIP[@]}" install --quiet "${SLIME_PINS[@]}"
"${PIP[@]}" freeze --exclude-editable | sort > "$VENV/before.txt"

step "pip install -e . (the plugin's own requirements only)"
"${PIP[@]}" install --quiet -e .
"${PIP[@]}" freeze --exclude-editable | sort > "$VENV/after.txt"

# Every package of the pinned environment must keep its version; new packages are fine.
changed=$(join -t= -j1 \
    <(sed 's/==/=/' "$VENV/before.txt" | sort -t= -k1,1) \
    <(sed 's/==/=/' "$VENV/after.txt" | sort -t= -k1,1) | awk -F= '$2 != $3')
removed=$(comm -23 <(cut -d= -f1 "$VENV/before.txt") <(cut -d= -f1 "$VENV/after.txt"))
if [[ -n "$changed$removed" ]]; then
    echo "FAIL: installing the plugin changed slime's environment:"
    [[ -n "$changed" ]] && echo "$changed" | awk -F= '{printf "  %s: %s -> %s\n", $1, $2, $3}'
    [[ -n "$removed" ]] && echo "$removed" | sed 's/^/  removed: /'
    exit 1
fi
echo "unchanged: $(wc -l < "$VENV/before.txt") packages, among them:"
grep -iE '^(torch|transformers|numpy|scipy)==' "$VENV/after.txt" | sed 's/^/  /'
"${PIP[@]}" check

step "test tools, $PYARROW_FOR_NUMPY1 and matplotlib for the local backend's tests, slime's pins kept"
printf '%s\n' "${SLIME_PINS[@]}" "torch==$TORCH_VERSION" > "$VENV/pins.txt"
"${PIP[@]}" install --quiet -c "$VENV/pins.txt" "$PYARROW_FOR_NUMPY1" matplotlib \
    pytest pytest-asyncio pytest-timeout hypothesis
"${PIP[@]}" freeze --exclude-editable | grep -iE '^(torch|transformers|numpy|scipy|pyarrow)==' | sed 's/^/  /'
"$VENV/bin/python" -c "import numpy, pyarrow; print(f'  numpy {numpy.__version__} with pyarrow {pyarrow.__version__} imports')"

step "the plugin's tests in slime's environment"
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    "$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider tests/models tests/rollout tests/integration tests/envs tests/packaging
