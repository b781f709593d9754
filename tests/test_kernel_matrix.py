"""Multi-kernel test: boots Debian cloud kernels under qemu with
scripts/kernel-matrix; on every kernel doctor must plan kprobes for the
design's hooks (tcp_set_state, tcp_reset, sk_stream_error), and repro must
give every scenario its expected verdict in the default plan, with
tracepoints preferred, and with kprobes preferred (which on 6.3+ moves the
report from sock_send_length to return probes).

The `matrix` test is slow (about 2 minutes with a warm cache, 3 cold) and is
selected with `-m matrix`; inside the guests the runner uses `-m 'not matrix'`.

Environment:
  EPIPE_MATRIX_CACHE    cache dir (default /var/cache/epipe-trace/matrix)
  EPIPE_MATRIX_KERNELS  kernel series (default 5.10,6.1,6.12)
  EPIPE_MATRIX_JOBS     guests in parallel (default: the runner's, 2)
  EPIPE_MATRIX_OUT      keep results here instead of a pytest tmp dir
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "kernel-matrix"
PYTHON = "/usr/bin/python3"
DEFAULT_CACHE = "/var/cache/epipe-trace/matrix"
DEFAULT_KERNELS = "5.10,6.1,6.12"


def run_matrix(*args, timeout=3600):
    return subprocess.run([PYTHON, str(SCRIPT), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.mark.matrix
@pytest.mark.timeout(3600)  # pytest-timeout: the guests run the whole suite
def test_kprobe_plan_and_verdicts_on_every_kernel(tmp_path):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed "
                    "(scripts/kernel-matrix --install-host-deps installs it)")
    if os.geteuid() != 0:
        pytest.skip("scripts/kernel-matrix needs root (debootstrap, mke2fs -d)")
    cache = os.environ.get("EPIPE_MATRIX_CACHE", DEFAULT_CACHE)
    kernels = [k.strip() for k in
               os.environ.get("EPIPE_MATRIX_KERNELS", DEFAULT_KERNELS).split(",")
               if k.strip()]
    out = Path(os.environ.get("EPIPE_MATRIX_OUT") or tmp_path / "matrix-out")
    args = ["--cache", cache, "--out", str(out), "--kernels", ",".join(kernels)]
    if os.environ.get("EPIPE_MATRIX_JOBS"):
        args += ["--jobs", os.environ["EPIPE_MATRIX_JOBS"]]

    p = run_matrix(*args)
    detail = "stdout:\n%s\nstderr (tail):\n%s" % (p.stdout, p.stderr[-4000:])
    assert p.returncode == 0, "kernel-matrix failed (rc %d)\n%s" % (p.returncode, detail)

    summary = json.loads((out / "summary.json").read_text())
    by_series = {r["series"]: r for r in summary["kernels"]}
    assert sorted(by_series) == sorted(kernels), detail

    problems = []
    for series in kernels:
        rec = by_series[series]
        release = rec["release"]
        kdir = out / release
        if not release.startswith(series + "."):
            problems.append("%s: release does not belong to series %s" % (release, series))
        uname = (kdir / "uname.txt").read_text().strip() if (kdir / "uname.txt").exists() else None
        if uname != release:
            problems.append("%s: guest reported uname %r" % (release, uname))
        try:
            doctor = json.loads((kdir / "doctor.json").read_text())
        except (OSError, ValueError) as e:
            problems.append("%s: no doctor.json (%s)" % (release, e))
            continue
        plan = {c["hook"]: c["mechanism"] for c in doctor["plan"]}
        for hook in ("state_change", "rst_received", "stream_error", "pipe_write_error",
                     "unix_send_error"):
            if plan.get(hook) != "kprobe":
                problems.append("%s: %s planned as %s, not kprobe" % (release, hook, plan.get(hook)))
        if doctor["verdict"] == "cannot run" or not doctor["load"].get("ok"):
            problems.append("%s: doctor says %s: %s" % (release, doctor["verdict"], doctor["why"]))
        for name in ("repro.json", "repro-tp.json", "repro-kp.json"):
            try:
                fp = json.loads((kdir / name).read_text())
            except (OSError, ValueError) as e:
                problems.append("%s: no %s (%s)" % (release, name, e))
                continue
            bad = [n for n, f in fp["scenarios"].items() if not f["as_expected"]]
            if bad:
                problems.append("%s %s: unexpected verdicts in %s" % (release, name, bad))
            if name == "repro.json":
                # the kprobes on the write paths name the kernel path that failed
                paths = {n: fp["scenarios"][n]["kernel_path"] for n in
                         ("own_shutdown", "pipe_ignored", "unix_peer_closed")}
                if paths != {"own_shutdown": "sk_stream_error", "pipe_ignored": "pipe_write",
                             "unix_peer_closed": "unix_stream_sendmsg"}:
                    problems.append("%s: kernel paths %s" % (release, paths))
        pytest_out = (kdir / "pytest.txt").read_text() if (kdir / "pytest.txt").exists() else ""
        if rec.get("status", {}).get("pytest") != "0":
            problems.append("%s: guest pytest failed:\n%s" % (release, pytest_out[-1500:]))
    assert not problems, "\n".join(problems) + "\n" + detail


# Fast checks of the runner's input handling (no qemu, no network).

@pytest.mark.parametrize("args, message", [
    (["--kernels", "4.19"], "unknown kernel series 4.19"),
    (["--kernels", ","], "--kernels is empty"),
    (["--jobs", "0"], "--jobs must be a positive number"),
])
def test_bad_arguments_give_one_line_error(args, message):
    p = run_matrix(*args, timeout=60)
    assert p.returncode != 0
    assert message in p.stderr
    assert "Traceback" not in p.stderr
