#!/usr/bin/env bash
# Build dilconv with DILCONV_DEBUG=1 (bounds checks in the kernels, -O0 -g) in a temporary
# copy of the repository, check that an out-of-range index in a kernel is caught as an
# IndexError (tools/debug_check.py), then run the test suite on the bounds-checked kernels,
# where an IndexError reported from a kernel's inner function fails the run.
#
# Usage: tools/debug_build.sh [REPO_ROOT] [PYTEST_ARGS...]
#        (default: the repository holding this script, and the whole suite)
# Env:   KEEP=1   keep the temporary copy (it is always kept when a step fails)
set -euo pipefail

root=$(cd "${1:-$(dirname "$0")/..}" && pwd)
shift || true
status=1
. "$(dirname "$0")/_copy_repo.sh"
start_work_copy "$root" dilconv-debug

echo "== build with DILCONV_DEBUG=1 (log: $work/build.log)"
if ! DILCONV_DEBUG=1 python setup.py build_ext --inplace -j 2 >"$work/build.log" 2>&1; then
    tail -30 "$work/build.log"
    exit 1
fi
# The debug copy, not an installed dilconv.
export PYTHONPATH="$work"

echo "== out-of-range indices"
python tools/debug_check.py
echo "== test suite on the bounds-checked kernels"
python -m pytest -q -p no:cacheprovider -W error::pytest.PytestUnraisableExceptionWarning "$@"
status=0
echo "== bounds checks on, no index out of range"
