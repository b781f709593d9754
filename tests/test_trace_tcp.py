"""The product on the real kernel: real sockets, real processes, real BPF."""
from __future__ import annotations

import signal

import pytest

from tracer import scenarios

pytestmark = pytest.mark.bpf


def run_traced(tracer, name: str, extra_args=(), **overrides):
    sc = scenarios.CATALOG[name]
    if overrides:
        sc = scenarios.Scenario(**{**sc.__dict__, **overrides})
    proc = scenarios.start(sc, gate=True)
    t = tracer("-p", str(proc.pid), *extra_args)
    scenarios.release(proc)
    outcome = scenarios.finish(sc, proc)
    rc, objs, err = t.stop_json()
    assert rc == 0, err
    fails = [o for o in objs if o["event"] == "broken_pipe"]
    return outcome, fails, objs


@pytest.mark.parametrize("mode", ["default", "syscalls"])
def test_slow_accept_shows_queue_wait_rst_in_close_wait_and_fate(tracer, mode):
    args = ["--syscalls"] if mode == "syscalls" else []
    outcome, fails, objs = run_traced(tracer, "slow_accept", args, delay=0.4)
    # the kernel's story: first write succeeds, the next two fail with EPIPE
    assert outcome.sends == [5, "EPIPE", "EPIPE"]
    assert len(fails) == 2
    for f in fails:
        assert f["pid"] == outcome.pid
        assert f["error"] == "EPIPE" and f["syscall"] == "sendto"
        assert f["cause"] == "accepted_after_peer_closed"
        assert f["sigpipe"] == "ignored"
        assert f["history"]["rst"]["state"] == "CLOSE_WAIT"
        assert f["history"]["error_reported"] == "EPIPE"
        # the scenario measured connect -> accept itself (about 450 ms), and
        # connect -> its client's close (about 50 ms)
        real = outcome.extra["queue_wait_ms"]
        assert real >= 440
        if mode == "syscalls":         # accept() is hooked: the wait is measured
            assert abs(f["accept_queue_wait_ms"] - real) < 50, (f["accept_queue_wait_ms"], real)
        else:                          # known from below: the FIN came before accept()
            assert "accept_queue_wait_ms" not in f
            low, high = f["accept_queue_wait_min_ms"], f["accept_queue_wait_max_ms"]
            assert abs(low - outcome.extra["peer_closed_ms"]) < 50, (low, outcome.extra)
            assert low <= real and high >= real - 50, (low, high, real)   # it brackets accept()
        states = [(s["from"], s["to"]) for s in f["history"]["states"]]
        assert ("ESTABLISHED", "CLOSE_WAIT") in states and ("CLOSE_WAIT", "CLOSE") in states
        assert f["remote"]["addr"] == "127.0.0.1" and f["local"]["port"] > 0
        assert f["bytes_sent"] == 5       # the first write went out before the RST
    summary = objs[-1]
    assert summary["event"] == "summary"
    assert summary["by_cause"] == {"accepted_after_peer_closed": 2}


@pytest.mark.parametrize("mode,how", [("default", "SHUT_WR or SHUT_RDWR"),
                                      ("syscalls", "SHUT_WR")])
def test_own_shutdown(tracer, mode, how):
    args = ["--syscalls"] if mode == "syscalls" else []
    outcome, fails, _ = run_traced(tracer, "own_shutdown", args)
    assert outcome.sends == [5, "EPIPE"]
    assert [f["cause"] for f in fails] == ["own_shutdown"]
    assert fails[0]["history"]["shutdown"]["how"] == how
    assert fails[0]["history"]["shutdown"]["pid"] == outcome.pid


def test_rst_while_established_gives_econnreset_then_epipe(tracer):
    outcome, fails, _ = run_traced(tracer, "rst_established")
    assert outcome.sends == [5, "ECONNRESET", "EPIPE"]
    assert [f["error"] for f in fails] == ["ECONNRESET", "EPIPE"]
    assert {f["cause"] for f in fails} == {"reset_while_established"}
    assert fails[0]["sigpipe"] == "not_raised"       # ECONNRESET raises no SIGPIPE
    assert fails[1]["sigpipe"] == "ignored"
    assert fails[0]["history"]["rst"]["state"] == "ESTABLISHED"


def test_msg_nosignal_is_suppressed(tracer):
    outcome, fails, _ = run_traced(tracer, "nosignal")
    assert outcome.sends == [5, "ECONNRESET", "EPIPE"]
    assert fails[-1]["sigpipe"] == "suppressed" and fails[-1]["msg_nosignal"] is True


def test_default_sigpipe_kills_and_tool_says_so(tracer):
    outcome, fails, objs = run_traced(tracer, "sigpipe_default")
    assert outcome.killed_by == signal.SIGPIPE
    assert fails and fails[0]["sigpipe"] == "fatal"
    killed = [o for o in objs if o["event"] == "killed_by_sigpipe"]
    assert [k["pid"] for k in killed] == [outcome.pid]
    assert objs[-1]["killed_by_sigpipe"] == 1
    assert objs[-1]["stop"] == "targets exited"


def test_handler_is_caught(tracer):
    outcome, fails, objs = run_traced(tracer, "sigpipe_handler")
    assert outcome.extra.get("handler_ran") == 1
    assert fails[0]["sigpipe"] == "caught"
    assert any(o["event"] == "sigpipe_delivered" and o["pid"] == outcome.pid for o in objs)


def test_blocked_sigpipe(tracer):
    _, fails, _ = run_traced(tracer, "sigpipe_blocked")
    assert fails[0]["sigpipe"] == "blocked"


def test_ipv6(tracer):
    outcome, fails, _ = run_traced(tracer, "slow_accept_ipv6")
    assert outcome.sends == [5, "EPIPE", "EPIPE"]
    assert fails[0]["family"] == "ipv6" and fails[0]["remote"]["addr"] == "::1"
    assert fails[0]["cause"] == "accepted_after_peer_closed"


def test_pid_filter_ignores_other_process(tracer):
    target = scenarios.start(scenarios.CATALOG["own_shutdown"], gate=True)
    other = scenarios.start(scenarios.CATALOG["rst_established"], gate=True)
    t = tracer("-p", str(target.pid))
    scenarios.release(other)
    scenarios.release(target)
    o_other = scenarios.finish(scenarios.CATALOG["rst_established"], other)
    o_target = scenarios.finish(scenarios.CATALOG["own_shutdown"], target)
    assert o_other.sends == [5, "ECONNRESET", "EPIPE"]      # it did break pipes
    rc, objs, _ = t.stop_json()
    fails = [o for o in objs if o["event"] == "broken_pipe"]
    assert {f["pid"] for f in fails} == {o_target.pid}
    assert objs[-1]["total"] == 1


def test_port_filter_in_kernel(tracer):
    """-D with a port nobody uses: failures happen, none is reported or counted."""
    sc = scenarios.CATALOG["own_shutdown"]
    proc = scenarios.start(sc, gate=True)
    t = tracer("-p", str(proc.pid), "-D", "9")
    scenarios.release(proc)
    assert scenarios.finish(sc, proc).sends == [5, "EPIPE"]
    rc, objs, _ = t.stop_json()
    assert [o["event"] for o in objs] == ["summary"] and objs[0]["total"] == 0


def test_table_output_and_timeline(tracer):
    sc = scenarios.CATALOG["slow_accept"]
    proc = scenarios.start(sc, gate=True)
    t = tracer("-p", str(proc.pid), "-T", "--timeline", json_mode=False)
    scenarios.release(proc)
    scenarios.finish(sc, proc)
    rc, out, err = t.stop()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "PID", "COMM"]
    event_lines = [ln for ln in lines if " sendto " in ln]
    assert len(event_lines) == 2
    assert all("accepted after the peer had already closed" in ln for ln in event_lines)
    assert any("RST received in CLOSE_WAIT" in ln for ln in lines)
    assert any("ESTABLISHED -> CLOSE_WAIT" in ln for ln in lines)
    assert "CAUSE" in out and "COUNT" in out     # the exit summary table


def test_stack_names_the_kernel_path(tracer):
    _, fails, _ = run_traced(tracer, "own_shutdown", extra_args=("--stack",))
    st = fails[0]["stack"]
    kernel = " ".join(st["kernel"])
    assert not st["kernel"][0].startswith("bpf_prog_")      # our own frames are trimmed
    assert "sk_stream_error" in kernel or "sock_send_length" in kernel, st["kernel"]
    assert "sys_sendto" in kernel
    assert st["user"], "user stack missing"


def _cgroup2_root():
    for ln in open("/proc/mounts"):
        parts = ln.split()
        if parts[2] == "cgroup2":
            return parts[1]
    return None


def test_cgroup_filter_traces_one_container(tracer, tmp_path):
    import os
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no cgroup v2 mounted")
    cg = os.path.join(root, f"epipe-test-{os.getpid()}")
    os.mkdir(cg)
    try:
        inside = scenarios.start(scenarios.CATALOG["own_shutdown"], gate=True)
        outside = scenarios.start(scenarios.CATALOG["own_shutdown"], gate=True)
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(inside.pid))
        t = tracer("--cgroup", cg)
        for p in (inside, outside):
            scenarios.release(p)
        o_in = scenarios.finish(scenarios.CATALOG["own_shutdown"], inside)
        o_out = scenarios.finish(scenarios.CATALOG["own_shutdown"], outside)
        assert o_out.sends == [5, "EPIPE"]                   # it broke a pipe too
        rc, objs, err = t.stop_json()
        fails = [o for o in objs if o["event"] == "broken_pipe"]
        assert [f["pid"] for f in fails] == [o_in.pid], err
    finally:
        os.rmdir(cg)


def test_comm_filter(tracer):
    sc = scenarios.CATALOG["own_shutdown"]
    named = scenarios.start(sc, gate=True, comm=b"epipe-victim")
    other = scenarios.start(sc, gate=True)
    t = tracer("-c", "epipe-victim")
    scenarios.release(named)
    scenarios.release(other)
    scenarios.finish(sc, named)
    scenarios.finish(sc, other)
    rc, objs, err = t.stop_json()
    fails = [o for o in objs if o["event"] == "broken_pipe"]
    assert [f["comm"] for f in fails] == ["epipe-victim"], err
    assert fails[0]["pid"] == named.pid
