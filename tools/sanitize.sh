#!/usr/bin/env bash
# Build dilconv with AddressSanitizer + UndefinedBehaviorSanitizer in a temporary copy of the
# repository, then run the test suite and a short fuzz campaign under them.
#
# Usage: tools/sanitize.sh [REPO_ROOT]        (default: the repository holding this script)
# Env:   ATHERIS_RUNS=N   atheris executions under the sanitizers (default 20000, 0: skip)
#        ATHERIS_CORPUS=DIR  start atheris from a copy of this corpus (e.g. an earlier run's)
#        KEEP=1           keep the temporary copy (it is always kept when a step fails)
#
# The copy is built with DILCONV_SANITIZE=1 (setup.py adds -fsanitize=address,undefined).
# Python itself is not instrumented, so the sanitizer runtimes are preloaded; leak detection
# is off because CPython does not free everything at exit (tests/test_resources.py measures
# leaks by RSS instead). Any sanitizer report aborts the step and fails the script.
# handle_segv=0: the fuzz lab's self-test crashes a worker on purpose and expects a plain
# SIGSEGV; real out-of-bounds accesses are caught by the instrumentation, not the handler.
set -euo pipefail

root=$(cd "${1:-$(dirname "$0")/..}" && pwd)
status=0
. "$(dirname "$0")/_copy_repo.sh"
start_work_copy "$root" dilconv-san
logs="$work/logs"
mkdir -p "$logs"

echo "== build with DILCONV_SANITIZE=1 (log: $logs/build.log)"
if ! DILCONV_SANITIZE=1 python setup.py build_ext --inplace -j 2 >"$logs/build.log" 2>&1; then
    tail -30 "$logs/build.log"
    status=1
    exit 1
fi

asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS="detect_leaks=0:handle_segv=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1:strict_string_checks=1:check_initialization_order=1:detect_stack_use_after_return=1:log_path=$logs/asan"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$logs/ubsan"
# The instrumented copy, not an installed dilconv.
export PYTHONPATH="$work"

run() {
    local name=$1
    shift
    echo "== $name"
    local start=$SECONDS
    if "$@" >"$logs/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s): $(tail -1 "$logs/$name.log")"
    else
        echo "   FAILED ($((SECONDS - start)) s), last lines of $logs/$name.log:"
        tail -20 "$logs/$name.log"
        status=1
    fi
}

run check-instrumented python -c "
import dilconv
from dilconv import _tiers
f = _tiers.kernels()._forward
assert dilconv.__file__.startswith('$work'), dilconv.__file__
assert b'__asan_report' in open(f.__file__, 'rb').read(), 'kernels are not instrumented'
print('instrumented kernels from', dilconv.__file__)"
run pytest python -m pytest -q -p no:cacheprovider
if [[ -d fuzz ]]; then
    run fuzz-lab python -m fuzz run --cases 200 --seed 1 --jobs 1 --timeout 300 --no-progress
fi
# Hypothesis-heavy pass over the kernel tests (the fuzz lab may not be present).
run hypothesis-long env DILCONV_HYPOTHESIS=long python -m pytest -q -p no:cacheprovider \
    tests/test_conv.py -k property
if [[ "${ATHERIS_RUNS:-20000}" != 0 ]] && python -c "import atheris" 2>/dev/null; then
    mkdir -p "$work/corpus" "$work/artifacts"
    if [[ -n "${ATHERIS_CORPUS:-}" ]]; then cp -r "$ATHERIS_CORPUS"/. "$work/corpus/"; fi
    run atheris python -W ignore tools/atheris_target.py -atheris_runs="${ATHERIS_RUNS:-20000}" \
        -max_len=512 -len_control=10 -artifact_prefix="$work/artifacts/" "$work/corpus"
fi

reports=$(ls "$logs"/asan.* "$logs"/ubsan.* 2>/dev/null || true)
if [[ -n "$reports" ]]; then
    echo "== sanitizer reports:"
    for f in $reports; do echo "--- $f"; head -40 "$f"; done
    status=1
fi
if [[ $status -eq 0 ]]; then echo "== clean under ASan + UBSan"; else echo "== FAILED"; fi
exit $status
