"""Unit tests: the plan picks the right mechanism for made-up kernels."""
from __future__ import annotations

import pytest

from tracer.capabilities import KernelCapabilities
from tracer.plan import FENTRY, KPROBE, RAW_TRACEPOINT, TRACEPOINT, UNAVAILABLE, make_plan

ALL_TPS = {
    "sock:inet_sock_set_state": ["skaddr", "oldstate", "newstate", "sport", "dport", "family",
                                 "protocol"],
    "tcp:tcp_receive_reset": ["skaddr", "sport", "dport"],
    "sock:inet_sk_error_report": ["error", "sport"],
    "sock:sock_send_length": ["sk", "family", "protocol", "ret", "flags"],
    "signal:signal_generate": ["sig", "errno", "code", "comm", "pid", "group", "result"],
    "signal:signal_deliver": ["sig", "errno", "code", "sa_handler", "sa_flags"],
    "sched:sched_process_exit": ["comm", "pid", "prio"],
    "syscalls:sys_exit_accept4": ["__syscall_nr", "ret"],
    "syscalls:sys_enter_shutdown": ["__syscall_nr", "fd", "how"],
    "syscalls:sys_enter_close": ["__syscall_nr", "fd"],
}
FUNCS = {"tcp_reset": ["struct sock *", "struct sk_buff *"],
         "sk_stream_error": ["struct sock *", "int", "int"],
         "tcp_set_state": ["struct sock *", "int"]}


def caps(kprobes=False, fentry=False, tps=None, funcs=None, raw=True) -> KernelCapabilities:
    return KernelCapabilities(
        release="test", machine="x86_64", btf=True, btf_path="/x", headers_dir=None,
        kprobes=kprobes, kprobes_reason="test", fentry=fentry, fentry_reason="test",
        raw_tracepoints=raw, ringbuf=True, tracefs="/t",
        tracepoints=dict(ALL_TPS if tps is None else tps),
        functions=dict(FUNCS if funcs is None else funcs))


def mech(plan, hook):
    return plan.by_name(hook).mechanism


@pytest.mark.parametrize("kprobes,fentry,want", [
    (True, True, KPROBE), (True, False, KPROBE), (False, True, FENTRY), (False, False, None)])
def test_design_hooks_prefer_kprobe_then_fentry_then_tracepoint(kprobes, fentry, want):
    p = make_plan(caps(kprobes=kprobes, fentry=fentry))
    assert mech(p, "state_change") == (want or RAW_TRACEPOINT)
    assert mech(p, "rst_received") == (want or TRACEPOINT)
    assert mech(p, "stream_error") == (want or RAW_TRACEPOINT)
    assert p.verdict()[0] == "ready"


def test_our_machine_no_kprobes_no_fentry_uses_tracepoints_everywhere():
    p = make_plan(caps())
    assert {c.mechanism for c in p.choices} <= {TRACEPOINT, RAW_TRACEPOINT}
    rej = p.by_name("rst_received").rejected
    assert any("kprobes unavailable" in r for r in rej) and any("fentry" in r for r in rej)


def test_kernel_5_10_without_new_tracepoints_keeps_kprobes_and_degrades():
    tps = {k: v for k, v in ALL_TPS.items()
           if k not in ("sock:sock_send_length", "sock:inet_sk_error_report")}
    p = make_plan(caps(kprobes=True, tps=tps))
    assert mech(p, "stream_error") == KPROBE
    assert mech(p, "error_report") == UNAVAILABLE
    verdict, why = p.verdict()
    assert verdict == "degraded" and "error reported" in why


def test_missing_tracepoint_without_kprobes_is_unavailable_with_consequence():
    tps = {k: v for k, v in ALL_TPS.items() if k != "tcp:tcp_receive_reset"}
    p = make_plan(caps(tps=tps))
    c = p.by_name("rst_received")
    assert c.mechanism == UNAVAILABLE
    assert "RSTs are not seen" in c.to_dict()["consequence"]


def test_signature_mismatch_rejects_kprobe():
    funcs = dict(FUNCS, sk_stream_error=["struct sock *", "long"])
    p = make_plan(caps(kprobes=True, funcs=funcs))
    assert mech(p, "stream_error") == RAW_TRACEPOINT
    assert any("does not start with" in r for r in p.by_name("stream_error").rejected)


def test_function_absent_rejects_kprobe():
    funcs = dict(FUNCS, tcp_set_state=None)
    p = make_plan(caps(kprobes=True, funcs=funcs))
    assert mech(p, "state_change") == RAW_TRACEPOINT


def test_tracepoint_missing_field_is_rejected():
    tps = dict(ALL_TPS, **{"signal:signal_generate": ["sig", "pid"]})
    p = make_plan(caps(tps=tps))
    assert mech(p, "sigpipe_generated") == UNAVAILABLE


def test_no_raw_tracepoints_cannot_run():
    p = make_plan(caps(raw=False))
    assert p.verdict()[0] == "cannot run"


def test_prefer_tracepoint_on_kprobe_kernel():
    p = make_plan(caps(kprobes=True), prefer="tracepoint")
    assert mech(p, "state_change") == RAW_TRACEPOINT
    assert mech(p, "stream_error") == RAW_TRACEPOINT


def test_macros_follow_mechanisms():
    m = make_plan(caps(kprobes=True)).macros()
    assert m["HOOK_STATE"] == 1 and m["HOOK_RST"] == 1 and m["HOOK_SERR"] == 1
    assert m["HOOK_SYSEXIT"] == 4 and m["HOOK_SIGGEN"] == 4 and m["HOOK_SIGDLV"] == 3


def test_no_raw_tracepoints_falls_back_to_classic_ones_where_it_can():
    p = make_plan(caps(raw=False))
    assert mech(p, "state_change") == TRACEPOINT
    assert mech(p, "sigpipe_generated") == TRACEPOINT


def test_pipe_write_path_follows_the_kernels_function_names():
    new = dict(FUNCS, anon_pipe_write=["struct kiocb *", "struct iov_iter *"],
               fifo_pipe_write=["struct kiocb *", "struct iov_iter *"], pipe_write=None)
    old = dict(FUNCS, pipe_write=["struct kiocb *", "struct iov_iter *"])
    assert make_plan(caps(kprobes=True, funcs=new)).by_name("pipe_write_error").target == \
        "anon_pipe_write,fifo_pipe_write"
    assert make_plan(caps(kprobes=True, funcs=old)).by_name("pipe_write_error").target == "pipe_write"
    half = dict(FUNCS, anon_pipe_write=["struct kiocb *"])     # fifo_pipe_write missing
    c = make_plan(caps(kprobes=True, funcs=half)).by_name("pipe_write_error")
    assert c.mechanism == RAW_TRACEPOINT and c.target == "raw_syscalls:sys_exit"
    assert any("fifo_pipe_write is not a probeable" in r for r in c.rejected)


def test_pipe_and_unix_paths_fall_back_to_syscall_exit_without_kprobes():
    p = make_plan(caps())
    for hook in ("pipe_write_error", "unix_send_error"):
        assert p.by_name(hook).target == "raw_syscalls:sys_exit"
    assert p.verdict()[0] == "ready"
