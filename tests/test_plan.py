"""Unit tests: the plan picks the right mechanism for made-up kernels."""
from __future__ import annotations

import pytest

from tracer.capabilities import KernelCapabilities
from tracer.plan import (FENTRY, KPROBE, OFF, RAW_TRACEPOINT, SHARED, TRACEPOINT, UNAVAILABLE,
                         make_plan)

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


UNIX_FUNCS = {"unix_stream_sendmsg": ["struct socket *", "struct msghdr *", "size_t"],
              "unix_seqpacket_sendmsg": ["struct socket *", "struct msghdr *", "size_t"]}


def caps(kprobes=False, fentry=False, tps=None, funcs=None, raw=True, btf=True,
         task_regs=None) -> KernelCapabilities:
    return KernelCapabilities(
        task_regs=btf if task_regs is None else task_regs,     # 5.15+ with BTF
        release="test", machine="x86_64", btf=btf, btf_path="/x" if btf else None,
        headers_dir=None if btf else "/lib/modules/test/build",
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
    assert {c.mechanism for c in p.choices} <= {TRACEPOINT, RAW_TRACEPOINT, SHARED, OFF}
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
    assert m["HOOK_SIGGEN"] == 4 and m["HOOK_SIGDLV"] == 3
    assert m["REPORT_SENDLEN"] == 1 and m["REPORT_PIPE_SIG"] == 1 and m["HOOK_SYSEXIT"] == 0
    assert m["HOOK_ACCEPT"] == m["HOOK_SHUT"] == m["HOOK_CLOSE"] == 0
    m = make_plan(caps(kprobes=True), syscalls=True).macros()
    assert m["REPORT_SENDLEN"] == 0 and m["REPORT_PIPE_SIG"] == 0 and m["HOOK_SYSEXIT"] == 4
    assert m["HOOK_ACCEPT"] == m["HOOK_SHUT"] == m["HOOK_CLOSE"] == 3


def test_no_syscall_hook_where_the_kernel_has_sock_send_length():
    """Any syscall tracepoint taxes every syscall on the host: report at
    sock_sendmsg's return and at SIGPIPE generation instead."""
    p = make_plan(caps())
    assert p.by_name("send_failure").target == "sock:sock_send_length"
    assert p.by_name("pipe_failure").target == "signal:signal_generate"
    for hook in ("accept", "shutdown", "close"):
        c = p.by_name(hook)
        assert c.mechanism == OFF and "--syscalls" in c.reason
        assert c.to_dict()["consequence"]            # doctor says what is lost
    assert not p.uses_syscall_hooks()
    assert p.verdict()[0] == "ready"                 # off on purpose is not degraded


def test_syscalls_flag_reports_at_syscall_exit_and_adds_the_syscall_hooks():
    p = make_plan(caps(), syscalls=True)
    assert p.by_name("send_failure").target == "raw_syscalls:sys_exit"
    assert p.by_name("pipe_failure").target == "raw_syscalls:sys_exit"
    assert {mech(p, h) for h in ("accept", "shutdown", "close")} == {TRACEPOINT}
    assert any("--syscalls" in r for r in p.by_name("send_failure").rejected)
    assert p.uses_syscall_hooks()


NO_SEND_LENGTH = {k: v for k, v in ALL_TPS.items() if k != "sock:sock_send_length"}


def test_kprobe_kernel_without_sock_send_length_reports_where_the_send_fails():
    """5.15-6.2 distro kernels: return probes on the failing functions (the
    TCP one runs only on errors) instead of every syscall's exit."""
    p = make_plan(caps(kprobes=True, tps=NO_SEND_LENGTH, funcs=dict(FUNCS, **UNIX_FUNCS),
                       task_regs=True))
    c = p.by_name("send_failure")
    assert c.mechanism == KPROBE
    assert c.target == "sk_stream_error,unix_stream_sendmsg,unix_seqpacket_sendmsg"
    assert p.by_name("pipe_failure").target == "signal:signal_generate"
    assert not p.uses_syscall_hooks()
    assert {mech(p, h) for h in ("accept", "shutdown", "close")} == {OFF}
    m = p.macros()
    assert m["REPORT_KRET"] == 1 and m["REPORT_SENDLEN"] == 0 and m["HOOK_SYSEXIT"] == 0
    assert m["REPORT_PIPE_SIG"] == 1
    # --syscalls, or a missing UNIX function: back to the syscall exit
    for p2 in (make_plan(caps(kprobes=True, tps=NO_SEND_LENGTH, funcs=dict(FUNCS, **UNIX_FUNCS),
                              task_regs=True), syscalls=True),
               make_plan(caps(kprobes=True, tps=NO_SEND_LENGTH, task_regs=True))):
        assert p2.by_name("send_failure").target == "raw_syscalls:sys_exit"
        assert p2.macros()["REPORT_KRET"] == 0
    # where sock_send_length exists it stays the report point (one hook for all),
    # unless kprobes are preferred: then no successful TCP send passes a hook
    p3 = make_plan(caps(kprobes=True, funcs=dict(FUNCS, **UNIX_FUNCS), task_regs=True))
    assert p3.by_name("send_failure").target == "sock:sock_send_length"
    p4 = make_plan(caps(kprobes=True, funcs=dict(FUNCS, **UNIX_FUNCS), task_regs=True),
                   prefer="kprobe")
    assert p4.by_name("send_failure").target == \
        "sk_stream_error,unix_stream_sendmsg,unix_seqpacket_sendmsg"
    assert not p4.uses_syscall_hooks()


def test_kernel_without_task_regs_needs_the_syscall_exit_and_takes_the_rest():
    """5.10: no bpf_task_pt_regs, so only the syscall exit knows the syscall."""
    p = make_plan(caps(kprobes=True, tps=NO_SEND_LENGTH, funcs=dict(FUNCS, **UNIX_FUNCS),
                       task_regs=False))
    assert any("bpf_task_pt_regs" in r for r in p.by_name("send_failure").rejected)
    assert p.by_name("send_failure").target == "raw_syscalls:sys_exit"
    assert p.by_name("pipe_failure").target == "raw_syscalls:sys_exit"
    assert "hooked anyway" in p.by_name("pipe_failure").reason
    assert {mech(p, h) for h in ("accept", "shutdown", "close")} == {TRACEPOINT}


def test_pipes_fall_back_to_syscall_exit_when_sigpipe_generation_is_not_hooked():
    tps = dict(ALL_TPS, **{"signal:signal_generate": ["sig", "pid"]})   # no result field
    p = make_plan(caps(tps=tps))
    assert p.by_name("send_failure").target == "sock:sock_send_length"
    c = p.by_name("pipe_failure")
    assert c.target == "raw_syscalls:sys_exit" and "not hooked" in c.reason
    m = p.macros()
    assert m["REPORT_SENDLEN"] == 1 and m["REPORT_PIPE_SIG"] == 0 and m["HOOK_SYSEXIT"] == 4


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
    assert c.mechanism == SHARED
    assert any("fifo_pipe_write is not a probeable" in r for r in c.rejected)


def test_pipe_and_unix_paths_are_served_by_the_report_point_without_kprobes():
    p = make_plan(caps())
    for hook in ("pipe_write_error", "unix_send_error"):
        c = p.by_name(hook)
        assert c.mechanism == SHARED and "report point" in c.reason
    assert p.verdict()[0] == "ready"


def test_without_btf_the_registers_cannot_be_read_so_the_syscall_exit_reports():
    p = make_plan(caps(kprobes=True, btf=False))
    assert p.by_name("send_failure").target == "raw_syscalls:sys_exit"
    assert any("needs BTF" in r for r in p.by_name("send_failure").rejected)
    assert p.by_name("pipe_failure").target == "raw_syscalls:sys_exit"
    assert p.uses_syscall_hooks() and p.verdict()[0] == "ready"
