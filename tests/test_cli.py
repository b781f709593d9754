"""The command line: bad input, exit codes, exit paths that must detach."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracer import scenarios

from .conftest import ROOT, Tracer, gated_python

PY = [sys.executable, "-m", "tracer"]


def run(*args, env=None, timeout=60, **kw):
    return subprocess.run([*PY, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def assert_one_line_error(r, code=2, *words):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args,words", [
    (["-p", "abc"], ["process id"]),
    (["-p", "999999"], ["999999", "does not exist"]),
    (["-L", "80,http"], ["port"]),
    (["-D", "70000"], ["port"]),
    (["-4", "-6"], ["-4 and -6"]),
    (["--type", "udp"], ["unknown type", "udp"]),
    (["-T", "-t"], ["exclude"]),
    (["--cgroup", "/nonexistent/cg"], ["cgroup"]),
    (["--cgroup", "/proc"], ["not on a cgroup v2"]),
    (["--buffer-pages", "3"], ["power of two"]),
    (["--bogus"], ["No such option"]),
])
def test_bad_input_one_line_exit_2(args, words):
    assert_one_line_error(run(*args), 2, *words)


def test_help_teaches():
    r = run("--help")
    assert r.returncode == 0 and "doctor" in r.stdout
    r = run("trace", "--help")
    assert r.returncode == 0
    for word in ("--pid", "--timeline", "accepted_after_peer_closed", "Exit codes"):
        assert word in r.stdout
    assert "--ebpf" not in r.stdout                       # hidden


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to drop to an unprivileged user")
def test_not_root_names_the_privilege():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        *PY, "-p", str(os.getpid())], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert_one_line_error(r, 2, "root", "CAP_BPF")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to drop capabilities")
def test_root_without_bpf_capabilities_names_the_missing_one():
    r = subprocess.run(["setpriv", "--bounding-set=-bpf,-sys_admin", "--inh-caps=-all",
                        *PY, "-p", str(os.getpid())], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert_one_line_error(r, 2, "CAP_BPF")
    assert "CAP_PERFMON" not in r.stderr           # that one it still has


def test_missing_privileges_logic():
    from tracer.cli import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, missing_privileges
    assert missing_privileges(1 << CAP_SYS_ADMIN) == []
    assert missing_privileges((1 << CAP_BPF) | (1 << CAP_PERFMON)) == []
    assert missing_privileges(1 << CAP_BPF) == ["CAP_PERFMON"]
    assert missing_privileges(0) == ["CAP_BPF", "CAP_PERFMON"]


@pytest.mark.bpf
def test_no_btf_no_headers_says_what_to_install(tmp_path):
    """A mount namespace hides the kernel's BTF: the real check, no test hook."""
    if not shutil.which("unshare"):
        pytest.skip("unshare missing")
    release = os.uname().release
    if Path(f"/lib/modules/{release}/build").exists():
        pytest.skip("this kernel has headers")
    cmd = (f"mount -t tmpfs none /sys/kernel/btf && "
           f"EPIPE_TRACE_CACHE={tmp_path} {sys.executable} -m tracer -d 1")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", cmd],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert_one_line_error(r, 2, "no BTF", f"linux-headers-{release}")


@pytest.mark.bpf
def test_corrupt_header_cache_is_rebuilt(tmp_path):
    env = dict(os.environ, EPIPE_TRACE_CACHE=str(tmp_path))
    r = run("doctor", "--json", env=env)
    assert r.returncode == 0, r.stderr
    tree = Path(json.loads(r.stdout)["header_tree"]["path"])
    vm = tree / "include" / "epipe" / "vmlinux.h"
    vm.write_text(vm.read_text()[: len(vm.read_text()) // 2])   # a torn write
    r = run("doctor", "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["header_tree"]["cached"] is False and doc["load"]["ok"] is True


def _prog_ids_of(pid: int) -> set[int]:
    ids = set()
    fddir = Path(f"/proc/{pid}/fdinfo")
    for p in fddir.iterdir():
        try:
            for line in p.read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
        except OSError:
            pass
    return ids


def _loaded_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "list", "--json"], capture_output=True, text=True)
    return {p["id"] for p in json.loads(out.stdout or "[]")}


def _still_loaded(ids: set[int], grace: float = 3.0) -> set[int]:
    """Programs of ours still in the kernel; the kernel frees a closed program
    after an RCU grace period, so allow it a moment."""
    deadline = time.monotonic() + grace
    while True:
        left = ids & _loaded_prog_ids()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.mark.bpf
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGHUP", "duration", "targets_exit"])
def test_every_exit_path_detaches(how):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(4)"])
    args = ["-p", str(sleeper.pid)]
    if how == "duration":
        args += ["-d", "1.5"]
    t = Tracer(args)
    ours = _prog_ids_of(t.proc.pid)
    assert len(ours) >= 5 and ours <= _loaded_prog_ids()
    if how.startswith("SIG"):
        t.proc.send_signal(getattr(signal, how))
    rc, objs, err = t.stop_json(sig=0) if how in ("duration", "targets_exit") else t.stop_json(sig=getattr(signal, how))
    sleeper.kill()
    sleeper.wait()
    assert rc == 0, err
    assert objs[-1]["event"] == "summary"
    assert "Traceback" not in err
    assert not _still_loaded(ours), "programs still loaded after exit"


@pytest.mark.bpf
def test_output_survives_head(tmp_path):
    """`epipe-trace ... | head -1`: exits 0, no traceback, nothing left loaded."""
    sc = scenarios.CATALOG["pipe_ignored"]
    proc = scenarios.start(sc, gate=True)
    tracer = subprocess.Popen([*PY, "-p", str(proc.pid)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=tracer.stdout, stdout=subprocess.PIPE)
    tracer.stdout.close()
    deadline = time.monotonic() + 60
    while b"tracing" not in (tracer.stderr.peek() if hasattr(tracer.stderr, "peek") else b""):
        assert time.monotonic() < deadline and tracer.poll() is None
        time.sleep(0.2)
    ours = _prog_ids_of(tracer.pid)
    scenarios.release(proc)
    scenarios.finish(sc, proc)
    first = head.communicate(timeout=30)[0].decode()
    rc = tracer.wait(timeout=30)
    err = tracer.stderr.read().decode()
    assert first.startswith("PID")
    assert rc == 0 and "Traceback" not in err, err
    assert ours and not _still_loaded(ours)


@pytest.mark.bpf
def test_hostile_process_name_is_escaped(tmp_path):
    sc = scenarios.CATALOG["own_shutdown"]
    hostile = b"ev\x1b[2Jil\xff"
    proc = scenarios.start(sc, gate=True, comm=hostile)
    t = Tracer(["-p", str(proc.pid)], json_mode=False)
    scenarios.release(proc)
    scenarios.finish(sc, proc)
    rc, out, err = t.stop()
    assert rc == 0, err
    assert "\x1b" not in out and "ev\\x1b[2Jil\\xff" in out

    proc = scenarios.start(sc, gate=True, comm=hostile)
    t = Tracer(["-p", str(proc.pid)])
    scenarios.release(proc)
    scenarios.finish(sc, proc)
    rc, objs, err = t.stop_json()
    ev = [o for o in objs if o["event"] == "broken_pipe"][0]
    assert bytes.fromhex(ev["comm_hex"]) == b"ev\x1b[2Jil\xff"


STORM = r"""
import errno, os, signal, socket, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
sys.stdin.readline()
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); a, _ = srv.accept()
a.shutdown(socket.SHUT_WR)
n = 0
end = time.monotonic() + 0.5
while time.monotonic() < end and n < 200000:
    try:
        a.send(b"x")
    except OSError as e:
        if e.errno == errno.EPIPE:
            n += 1
print(n)
"""


@pytest.mark.bpf
def test_lost_events_are_reported_and_summary_stays_exact():
    """A one-page ring buffer cannot keep up with an EPIPE storm."""
    proc = gated_python(STORM)
    t = Tracer(["-p", str(proc.pid), "--buffer-pages", "1"])
    scenarios.release(proc)
    epipes = int(proc.communicate(timeout=60)[0])
    rc, objs, err = t.stop_json()
    assert rc == 0, err
    summary = objs[-1]
    shown = sum(1 for o in objs if o["event"] == "broken_pipe")
    lost_live = sum(o["count"] for o in objs if o["event"] == "lost")
    assert epipes > 1000
    assert summary["total"] == epipes                      # exact, from kernel counters
    assert summary["by_cause"] == {"own_shutdown": epipes}
    assert summary["lost_events"] > 0
    assert shown + summary["lost_events"] == epipes        # every event shown or counted lost
    assert lost_live == summary["lost_events"]             # and said live, not only at the end


@pytest.mark.bpf
def test_two_instances_trace_and_detach_independently():
    from tracer import scenarios
    sc = scenarios.CATALOG["own_shutdown"]
    proc = scenarios.start(sc, gate=True)
    a = Tracer(["-p", str(proc.pid)])
    b = Tracer(["-p", str(proc.pid), "--type", "tcp"])
    ids_a, ids_b = _prog_ids_of(a.proc.pid), _prog_ids_of(b.proc.pid)
    assert ids_a and ids_b and not ids_a & ids_b
    rc, objs_a, _ = a.stop_json()
    assert not _still_loaded(ids_a) and ids_b <= _loaded_prog_ids()   # b untouched
    scenarios.release(proc)
    scenarios.finish(sc, proc)
    rc_b, objs_b, err = b.stop_json()
    assert rc == 0 and rc_b == 0, err
    assert objs_a[-1]["total"] == 0                      # a had stopped before the failure
    assert objs_b[-1]["by_cause"] == {"own_shutdown": 1}
    assert not _still_loaded(ids_b)


@pytest.mark.bpf
def test_ctrl_c_and_live_loss_reports_work_during_a_storm():
    """The consumer must not be captured by a producer that outpaces it: Ctrl-C
    ends the tool while the storm is still going (the storm only stops when we
    kill it, so a captured consumer shows up as a hang, not as a slow stop)."""
    storm = STORM.replace("time.monotonic() + 0.5", "time.monotonic() + 120").replace(
        "n < 200000", "True")
    proc = gated_python(storm)
    try:
        t = Tracer(["-p", str(proc.pid), "--buffer-pages", "1"])
        scenarios.release(proc)
        time.sleep(1.5)
        assert proc.poll() is None                      # the storm is going
        t.proc.send_signal(signal.SIGINT)
        try:
            out, err = t.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            t.proc.kill()
            pytest.fail("Ctrl-C did not end the tool during a storm")
        assert proc.poll() is None, "the storm ended first: the test proves nothing"
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    objs = [json.loads(line) for line in out.decode().splitlines()]
    assert t.proc.returncode == 0, err
    lost = [o for o in objs if o["event"] == "lost"]
    assert lost and objs[-1]["event"] == "summary" and objs[-1]["lost_events"] > 0


@pytest.mark.bpf
def test_exception_in_event_callback_detaches_and_surfaces():
    """An error while handling an event ends the session with that error,
    and nothing stays attached."""
    import io
    import threading

    from tracer import scenarios
    from tracer.program import Filters
    from tracer.session import Session, SessionOptions, prepare

    class Broken(io.StringIO):
        def write(self, text):
            raise RuntimeError("renderer broke")

    sc = scenarios.CATALOG["own_shutdown"]
    proc = scenarios.start(sc, gate=True)
    opts = SessionOptions(filters=Filters(pids=[proc.pid]), json=True)
    _caps, tree, plan = prepare(opts)
    sess = Session(opts, out=Broken())
    held: set[int] = set()

    def ready(s):
        held.update(_prog_ids_of(os.getpid()))
        threading.Thread(target=lambda: scenarios.release(proc), daemon=True).start()

    with pytest.raises(RuntimeError, match="renderer broke"):
        sess.run(plan, tree, ready_cb=ready)
    scenarios.finish(sc, proc)
    assert held and not sess.loaded.attached           # detached by run() itself
    assert not _still_loaded(held)


@pytest.mark.bpf
def test_no_tracefs_and_no_way_to_mount_it(tmp_path):
    """/sys/kernel hidden under an empty tmpfs (BTF put back): there is no
    directory to mount tracefs on, so the tool must say so and stop."""
    if not shutil.which("unshare"):
        pytest.skip("unshare missing")
    keep = tmp_path / "btf"
    keep.mkdir()
    cmd = (f"mount --bind /sys/kernel/btf {keep} && mount -t tmpfs none /sys/kernel && "
           f"mkdir /sys/kernel/btf && mount --bind {keep} /sys/kernel/btf && "
           f"{sys.executable} -m tracer -d 1")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", cmd],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert_one_line_error(r, 2, "tracefs is not mounted", "mount -t tracefs")


@pytest.mark.bpf
def _holds_bpf_map(pid: int) -> bool:
    for p in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            if "map_id:" in p.read_text():
                return True
        except OSError:
            pass
    return False


def test_target_exiting_during_start_up_is_an_error():
    """The target dies while the probes are being loaded: bcc creates the maps
    before it loads and attaches the programs, so the target is killed once
    the tool holds a map (a sleep-based target raced the faster start-up)."""
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    tool = subprocess.Popen([*PY, "-p", str(target.pid)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _holds_bpf_map(tool.pid):
        assert tool.poll() is None and time.monotonic() < deadline, tool.communicate()
        time.sleep(0.002)
    target.kill()
    target.wait()
    out, err = tool.communicate(timeout=60)
    r = subprocess.CompletedProcess(tool.args, tool.returncode, out, err)
    assert_one_line_error(r, 2, str(target.pid))
    assert "exited" in r.stderr


MANY_REMOTES = r"""
import errno, signal, socket, sys
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
sys.stdin.readline()
n = 0
for i in range(12):              # 12 remote endpoints: 12 listening ports
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    c = socket.create_connection(srv.getsockname())
    c.shutdown(socket.SHUT_WR)
    for _ in range(3):
        try:
            c.send(b"x")
        except OSError as e:
            n += e.errno == errno.EPIPE
    c.close(); srv.close()
print(n)
"""


@pytest.mark.bpf
def test_summary_stays_exact_when_the_remote_table_fills():
    """Causes and fates come from a table keyed by facts only; the by-remote
    table is best effort. With room for 4 endpoints and 12 remotes, the
    totals stay exact and the shortfall is one named bucket."""
    import io
    import threading

    from tracer.program import Filters, ProgramOptions
    from tracer.session import Session, SessionOptions, prepare

    proc = gated_python(MANY_REMOTES)
    opts = SessionOptions(filters=Filters(pids=[proc.pid]), json=True,
                          program=ProgramOptions(count_entries=4))
    _caps, tree, plan = prepare(opts)
    out = io.StringIO()
    sess = Session(opts, out=out)
    result = {}

    def drive():
        scenarios.release(proc)
        result["epipes"] = int(proc.communicate(timeout=60)[0])
        sess.request_stop("workload done")

    sess.run(plan, tree, ready_cb=lambda s: threading.Thread(target=drive, daemon=True).start())
    summary = [json.loads(line) for line in out.getvalue().splitlines()][-1]
    epipes = result["epipes"]
    assert epipes == 36
    assert summary["total"] == epipes and summary["by_cause"] == {"own_shutdown": epipes}
    assert summary["uncounted"] == 0
    remotes = summary["by_remote"]
    assert 1 <= len([r for r in remotes if r.startswith("127.0.0.1:")]) <= 4
    assert summary["remote_uncounted"] > 0
    assert remotes["(other endpoints: table full)"] == summary["remote_uncounted"]
    assert sum(remotes.values()) == epipes
