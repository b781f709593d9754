#!/bin/bash
# Guest job of scripts/kernel-matrix: runs inside each booted kernel with
# cwd /job/src, PYTHONPATH=/job/src and OUT=<writable dir copied back to the host>.
# Every step runs even if an earlier one failed; each step's exit code is
# appended to $OUT/status.txt as "name rc".
set -u
OUT=${OUT:-/out}
mkdir -p "$OUT"
: > "$OUT/status.txt"
cd "${JOB_SRC:-/job/src}" || exit 1
# per-step limit (seconds); the host kills the whole guest at --timeout anyway
STEP_TIMEOUT=${STEP_TIMEOUT:-600}

step() {  # step NAME CMD...   (stdout/stderr redirections are the caller's)
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*" >&2
    timeout -k 10 "$STEP_TIMEOUT" "$@"
    local rc=$?
    echo "$name $rc" >> "$OUT/status.txt"
    echo "== $name rc=$rc in $((SECONDS - t0))s" >&2
    echo "epipe-matrix: step $name rc=$rc $((SECONDS - t0))s" > /dev/console 2>/dev/null
    return 0
}

step uname  uname -r > "$OUT/uname.txt"
# one bcc compile costs 30-60 s under TCG: every step below compiles once
step doctor python3 -m tracer doctor --json > "$OUT/doctor.json" 2> "$OUT/doctor.err"
step repro  python3 -m tracer repro --json "$OUT/repro.json" > "$OUT/repro.out" 2>&1
step repro_tp python3 -m tracer repro --prefer tracepoint --json "$OUT/repro-tp.json" \
    > "$OUT/repro-tp.out" 2>&1
# kprobes first everywhere: on 6.3+ this reports at the return probes instead
# of sock_send_length (elsewhere it is the default plan again)
step repro_kp python3 -m tracer repro --prefer kprobe --json "$OUT/repro-kp.json" \
    > "$OUT/repro-kp.out" 2>&1

timeout_flag=()
if python3 -c 'import pytest_timeout' 2>/dev/null; then
    timeout_flag=(--timeout "${PYTEST_TIMEOUT:-300}")
fi
# the pure tests, and the BTF-generated header tree on this kernel (the
# scenarios themselves ran above, all in one trace)
step pytest python3 -m pytest -q -p no:cacheprovider -m 'not matrix' \
    tests/test_plan.py tests/test_explain.py tests/test_headers_unit.py tests/test_render.py \
    tests/test_compiler_unit.py \
    tests/test_headers_bpf.py "${timeout_flag[@]}" > "$OUT/pytest.txt" 2>&1
exit 0
