"""The probe plan: for each logical hook, the mechanism this kernel supports.

Pure logic over ``KernelCapabilities`` so it can be unit-tested with made-up
kernels. The design's kprobes (``tcp_set_state``, ``tcp_reset``,
``sk_stream_error``) win where kprobes work and the function's signature is
what our program expects; fentry is next where the kernel allows trampolines;
tracepoints otherwise. Each choice carries the reason, and an unavailable hook
says what the user loses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .capabilities import KernelCapabilities

KPROBE, FENTRY, TRACEPOINT, RAW_TRACEPOINT, UNAVAILABLE = (
    "kprobe", "fentry", "tracepoint", "raw_tracepoint", "unavailable")
# not failures of the plan: "shared" hooks are served by another hook's probe,
# "off" hooks are left out on purpose (the syscall hooks, see SYSCALL_COST)
SHARED, OFF = "shared", "off"

# Value of the HOOK_* macro in bpf/epipe.bpf.c for each mechanism.
MACRO_VALUE = {UNAVAILABLE: 0, KPROBE: 1, FENTRY: 2, TRACEPOINT: 3, RAW_TRACEPOINT: 4,
               SHARED: 0, OFF: 0}

SYS_EXIT = "raw_syscalls:sys_exit"
SEND_LENGTH = "sock:sock_send_length"
SIGNAL_GENERATE = "signal:signal_generate"
# return probes on the functions that fail a socket send (REPORT_KRET)
SEND_RETURNS = "sk_stream_error,unix_stream_sendmsg,unix_seqpacket_sendmsg"
# Why the syscall hooks are off unless asked for (measured with scripts/bench)
SYSCALL_COST = ("off: any syscall tracepoint puts every syscall of every process on "
                "the kernel's slow path (here: send path 0.88 -> 0.71 of untraced); "
                "--syscalls adds it")
SYSCALL_HOOKS = ("accept", "shutdown", "close")


@dataclass(frozen=True)
class Candidate:
    mechanism: str
    target: str                       # function or "category:event"
    # expected leading parameter types (functions) or fields (tracepoints)
    expects: tuple[str, ...] = ()


@dataclass(frozen=True)
class HookSpec:
    name: str          # stable identifier (JSON, --json doctor)
    macro: str         # HOOK_* macro in the BPF C
    title: str         # what it observes, for people
    candidates: tuple[Candidate, ...]
    if_missing: str    # consequence when no candidate works
    essential: bool = False   # without it the tool cannot run at all


def _fn(name: str, *types: str) -> tuple[Candidate, Candidate]:
    return Candidate(KPROBE, name, types), Candidate(FENTRY, name, types)


HOOKS: tuple[HookSpec, ...] = (
    HookSpec("state_change", "HOOK_STATE", "TCP state change",
             (*_fn("tcp_set_state", "struct sock *", "int"),
              Candidate(RAW_TRACEPOINT, "sock:inet_sock_set_state",
                        ("skaddr", "oldstate", "newstate", "protocol")),
              Candidate(TRACEPOINT, "sock:inet_sock_set_state",
                        ("skaddr", "oldstate", "newstate", "protocol"))),
             "no TCP state history: causes that depend on CLOSE_WAIT or accept timing "
             "cannot be named"),
    HookSpec("rst_received", "HOOK_RST", "RST received (tcp_reset)",
             (*_fn("tcp_reset", "struct sock *"),
              Candidate(TRACEPOINT, "tcp:tcp_receive_reset", ("skaddr",))),
             "RSTs are not seen: 'peer reset' causes become 'unknown'"),
    HookSpec("stream_error", "HOOK_SERR", "stream error on send (sk_stream_error)",
             (*_fn("sk_stream_error", "struct sock *", "int", "int"),
              Candidate(RAW_TRACEPOINT, "sock:sock_send_length", ("sk", "ret", "flags"))),
             "the kernel path of the error and sk_err at that moment are not observed "
             "(the syscall's result is still reported)"),
    HookSpec("error_report", "HOOK_EREP", "socket error reported (sk_err set)",
             (Candidate(RAW_TRACEPOINT, "sock:inet_sk_error_report", ("error",)),),
             "the error the kernel set on the socket (ETIMEDOUT, ECONNRESET...) is not "
             "recorded; it is still read at sk_stream_error where that is probed"),
    HookSpec("send_failure", "HOOK_SEND", "failing socket send reported",
             (Candidate(RAW_TRACEPOINT, SEND_LENGTH, ("sk", "ret")),
              Candidate(KPROBE, SEND_RETURNS),
              Candidate(RAW_TRACEPOINT, SYS_EXIT)),
             "failing sends cannot be seen", essential=True),
    HookSpec("accept", "HOOK_ACCEPT", "accept() returns a socket",
             (Candidate(TRACEPOINT, "syscalls:sys_exit_accept4", ("ret",)),),
             "the accept-queue wait is bracketed, not measured (after the peer's FIN, "
             "which came while the connection was unaccepted; before the RST that "
             "answered our write); 'accepted after the peer closed' is still named"),
    HookSpec("shutdown", "HOOK_SHUT", "our own shutdown()",
             (Candidate(TRACEPOINT, "syscalls:sys_enter_shutdown", ("fd", "how")),),
             "our shutdown() is inferred (TCP: the FIN we sent while the socket was "
             "open; UNIX: our send side shut while the peer is open), SHUT_WR and "
             "SHUT_RDWR not told apart"),
    HookSpec("pipe_write_error", "HOOK_PIPE", "pipe/FIFO write path (no readers)",
             (Candidate(KPROBE, "anon_pipe_write,fifo_pipe_write", ("struct kiocb *",)),
              Candidate(KPROBE, "pipe_write", ("struct kiocb *",))),
             "the pipe write function is not named (the failure is still reported)"),
    HookSpec("unix_send_error", "HOOK_UNIX", "UNIX stream send path (shut down)",
             (Candidate(KPROBE, "unix_stream_sendmsg", ("struct socket *",)),),
             "unix_stream_sendmsg is not named (the failure is still reported)"),
    HookSpec("close", "HOOK_CLOSE", "close() of a UNIX socket or pipe read end",
             (Candidate(TRACEPOINT, "syscalls:sys_enter_close", ("fd",)),),
             "a pipe reader that closed its read end, and when a UNIX peer closed, are "
             "not named (readers that exited still are)"),
    HookSpec("sigpipe_generated", "HOOK_SIGGEN", "SIGPIPE generated",
             (Candidate(RAW_TRACEPOINT, "signal:signal_generate", ("sig", "pid", "group", "result")),
              Candidate(TRACEPOINT, "signal:signal_generate", ("sig", "pid", "result"))),
             "the SIGPIPE's fate (ignored, blocked, caught, fatal) is unknown"),
    HookSpec("pipe_failure", "HOOK_PIPEREP", "failing pipe/FIFO write reported",
             (Candidate(RAW_TRACEPOINT, SIGNAL_GENERATE), Candidate(RAW_TRACEPOINT, SYS_EXIT)),
             "pipe and FIFO failures are not seen at all"),
    HookSpec("sigpipe_delivered", "HOOK_SIGDLV", "SIGPIPE delivered",
             (Candidate(TRACEPOINT, "signal:signal_deliver", ("sig", "sa_handler")),),
             "delivery to a handler is not confirmed"),
    HookSpec("process_exit", "HOOK_EXIT", "process exit (death by SIGPIPE)",
             (Candidate(TRACEPOINT, "sched:sched_process_exit", ("pid",)),),
             "deaths by SIGPIPE are not confirmed"),
)


@dataclass(frozen=True)
class Choice:
    hook: HookSpec
    mechanism: str
    target: str
    reason: str
    rejected: tuple[str, ...] = ()    # why better candidates were passed over

    def to_dict(self) -> dict:
        return {"hook": self.hook.name, "title": self.hook.title,
                "mechanism": self.mechanism, "target": self.target, "reason": self.reason,
                "rejected": list(self.rejected),
                "consequence": (self.hook.if_missing if self.mechanism in (UNAVAILABLE, OFF)
                                else None)}


@dataclass
class ProbePlan:
    choices: list[Choice] = field(default_factory=list)

    def by_name(self, name: str) -> Choice:
        for c in self.choices:
            if c.hook.name == name:
                return c
        raise KeyError(name)

    def macros(self) -> dict[str, int]:
        m = {c.hook.macro: MACRO_VALUE[c.mechanism] for c in self.choices}
        targets = {c.hook.name: c.target for c in self.choices}
        # where failures are reported: sock_sendmsg's return / SIGPIPE generation
        # (no syscall hook at all), or the raw sys_exit
        m["REPORT_SENDLEN"] = int(targets.get("send_failure") == SEND_LENGTH)
        m["REPORT_KRET"] = int(targets.get("send_failure") == SEND_RETURNS)
        m["REPORT_PIPE_SIG"] = int(targets.get("pipe_failure") == SIGNAL_GENERATE)
        m["HOOK_SYSEXIT"] = 4 if SYS_EXIT in (targets.get("send_failure"),
                                              targets.get("pipe_failure")) else 0
        return m

    def uses_syscall_hooks(self) -> bool:
        return any(c.target.startswith(("syscalls:", "raw_syscalls:")) for c in self.choices)

    def unavailable(self) -> list[Choice]:
        return [c for c in self.choices if c.mechanism == UNAVAILABLE]

    def verdict(self) -> tuple[str, str]:
        """('ready'|'degraded'|'cannot run', explanation)."""
        missing = self.unavailable()
        fatal = [c for c in missing if c.hook.essential]
        if fatal:
            return "cannot run", "; ".join(f"{c.hook.title}: {c.hook.if_missing}" for c in fatal)
        if missing:
            return "degraded", "; ".join(f"{c.hook.title}: {c.hook.if_missing}" for c in missing)
        return "ready", "every hook has a mechanism"

    def to_list(self) -> list[dict]:
        return [c.to_dict() for c in self.choices]


def _signature_matches(have: list[str], expects: tuple[str, ...]) -> bool:
    return tuple(have[:len(expects)]) == expects


def _try(c: Candidate, caps: KernelCapabilities) -> str | None:
    """None when the candidate is usable here, else why not."""
    if c.mechanism in (KPROBE, FENTRY):
        if c.mechanism == KPROBE and not caps.kprobes:
            return f"kprobes unavailable ({caps.kprobes_reason})"
        if c.mechanism == FENTRY and not caps.fentry:
            return f"fentry unavailable ({caps.fentry_reason})"
        for fn in c.target.split(","):       # a list: every function must be there
            params = caps.functions.get(fn)
            if params is None:
                return f"{fn} is not a probeable kernel function here"
            if params and not _signature_matches(params, c.expects):
                return f"{fn}({', '.join(params)}) does not start with ({', '.join(c.expects)})"
            if not params and c.mechanism == FENTRY:
                return f"{fn} has no BTF signature"
        return None
    if c.mechanism == RAW_TRACEPOINT:
        if not caps.raw_tracepoints:
            return "raw tracepoints unsupported"
        if c.target == "raw_syscalls:sys_exit":
            return None
    if c.target not in caps.tracepoints:
        return f"tracepoint {c.target} does not exist on this kernel"
    fields = caps.tracepoints[c.target]
    missing = [f for f in c.expects if f not in fields]
    if missing:
        return f"tracepoint {c.target} lacks field(s) {', '.join(missing)}"
    return None


def make_plan(caps: KernelCapabilities, prefer: str | None = None,
              disable: frozenset[str] = frozenset(), syscalls: bool = False) -> ProbePlan:
    """Choose a mechanism per hook.

    ``prefer`` ("kprobe", "fentry", "tracepoint") moves that mechanism to the
    front where a hook has it, for comparing mechanisms on one kernel;
    ``disable`` names hooks to leave out. ``syscalls`` reports failures at the
    syscall's exit and adds the accept/shutdown/close syscall hooks: exact
    accept time, shutdown() caller and how, the pipe reader that closed. Without
    it, where the kernel has ``sock:sock_send_length``, no syscall is hooked at
    all, since any syscall tracepoint taxes every syscall on the host; on older
    kernels the syscall exit is the only report point and the others come along.
    """
    plan = ProbePlan()
    for hook in HOOKS:
        if hook.name in disable:
            plan.choices.append(Choice(hook, UNAVAILABLE, "", "disabled by request"))
            continue
        cands = list(hook.candidates)
        if prefer:
            cands.sort(key=lambda c: 0 if c.mechanism == prefer or
                       (prefer == TRACEPOINT and c.mechanism == RAW_TRACEPOINT) else 1)
        rejected = []
        if hook.name == "send_failure" and (syscalls or not caps.task_regs):
            # every report point but the syscall exit reads the syscall from
            # the task's registers (bpf_get_current_task_btf, bpf_task_pt_regs)
            why = ("--syscalls reports at the syscall's exit" if syscalls else
                   "reading the task's registers there needs BTF and bpf_task_pt_regs (5.15+)")
            rejected += [f"{c.mechanism} {c.target}: {why}" for c in cands
                         if c.target in (SEND_LENGTH, SEND_RETURNS)]
            cands = [c for c in cands if c.target not in (SEND_LENGTH, SEND_RETURNS)]
        if hook.name in SYSCALL_HOOKS and not syscalls and _report_target(plan) != SYS_EXIT:
            plan.choices.append(Choice(hook, OFF, "", SYSCALL_COST))
            continue
        if hook.name == "pipe_failure":
            plan.choices.append(_pipe_report(hook, plan, caps))
            continue
        for c in cands:
            why = _try(c, caps)
            if why is None:
                reason = {KPROBE: "kprobes work and the signature matches",
                          FENTRY: "fentry works and the signature matches",
                          TRACEPOINT: "tracepoint present with the fields we read",
                          RAW_TRACEPOINT: "raw tracepoint present"}[c.mechanism]
                if c.target == SYS_EXIT:
                    reason = "raw sys_exit sees every syscall's registers and result"
                elif c.target == SEND_LENGTH and hook.name == "send_failure":
                    reason = ("reported where sock_sendmsg() returns the error; the "
                              "syscall and fd are read from the task's registers, so "
                              "no syscall is hooked")
                elif c.target == SEND_RETURNS:
                    reason = ("reported where the failing function returns (return "
                              "probes; sk_stream_error's runs only when a TCP send "
                              "fails); the syscall and fd are read from the task's "
                              "registers, so no syscall is hooked")
                plan.choices.append(Choice(hook, c.mechanism, c.target, reason, tuple(rejected)))
                break
            rejected.append(f"{c.mechanism} {c.target}: {why}")
        else:
            if hook.name in ("pipe_write_error", "unix_send_error"):
                plan.choices.append(Choice(
                    hook, SHARED, "", "no probe of its own: the report point sees these "
                    "failures (the write function is not named)", tuple(rejected)))
                continue
            plan.choices.append(Choice(hook, UNAVAILABLE, "", "; ".join(rejected), tuple(rejected)))
    return plan


def _report_target(plan: ProbePlan) -> str:
    try:
        return plan.by_name("send_failure").target
    except KeyError:
        return ""


def _pipe_report(hook: HookSpec, plan: ProbePlan, caps: KernelCapabilities) -> Choice:
    """Pipes: a write with no readers always raises SIGPIPE (pipe_write(),
    splice), so with no syscall hook the failure is reported where the
    signal is generated. Where the syscall exit is hooked anyway, report there."""
    send = _report_target(plan)
    try:
        sig = plan.by_name("sigpipe_generated")
    except KeyError:
        sig = None
    if send != SYS_EXIT and caps.task_regs and sig is not None and sig.mechanism not in (UNAVAILABLE, OFF):
        return Choice(hook, sig.mechanism, SIGNAL_GENERATE,
                      "a pipe write with no readers always raises SIGPIPE: reported where "
                      "the signal is generated (the fd is read from the task's registers)")
    if caps.raw_tracepoints:
        why = ("the syscall exit is hooked anyway" if send == SYS_EXIT else
               "SIGPIPE generation is not hooked")
        return Choice(hook, RAW_TRACEPOINT, SYS_EXIT, f"raw sys_exit ({why})")
    return Choice(hook, UNAVAILABLE, "", "raw tracepoints unsupported")
