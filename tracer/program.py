"""The BPF program text for one plan and one set of filters.

The C lives in ``bpf/epipe.bpf.c``; this module only decides the ``-D``
macros (mechanism per hook, filters, map sizes, the architecture's syscall
numbers and register names), so ``--ebpf`` can show exactly what bcc compiles.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .plan import ProbePlan

KINDS = {"tcp": 1, "unix": 2, "pipe": 3, "fifo": 4, "socket": 5, "other": 0}

# syscall numbers of the send family, per architecture
_SYSCALLS = {
    "x86_64": dict(write=1, writev=20, sendto=44, sendmsg=46, sendmmsg=307, sendfile=40,
                   splice=275, pwritev=296, pwritev2=328, vmsplice=278, tee=276, pwrite64=18),
    "aarch64": dict(write=64, writev=66, sendto=206, sendmsg=211, sendmmsg=269, sendfile=71,
                    splice=76, pwritev=70, pwritev2=287, vmsplice=75, tee=77, pwrite64=68),
}
# how to read the syscall number and arguments from the user pt_regs at sys_exit
_REGS = {
    "x86_64": dict(REG_NR="orig_ax", REG_ARG1="di", REG_ARG2="si", REG_ARG3="dx",
                   REG_ARG4="r10"),
    "aarch64": dict(REG_NR="syscallno", REG_ARG1="orig_x0", REG_ARG2="regs[1]",
                    REG_ARG3="regs[2]", REG_ARG4="regs[3]"),
}


def syscall_names(machine: str | None = None) -> dict[int, str]:
    table = _SYSCALLS.get(machine or platform.machine(), _SYSCALLS["x86_64"])
    return {nr: name for name, nr in table.items()}


@dataclass
class Filters:
    pids: list[int] = field(default_factory=list)
    comm: str | None = None
    lports: list[int] = field(default_factory=list)
    dports: list[int] = field(default_factory=list)
    family: int = 0                 # 0 any, 2 IPv4, 10 IPv6
    cgroup_id: int | None = None
    kinds: set[str] | None = None   # None: all


@dataclass
class ProgramOptions:
    stacks: bool = False
    ringbuf_pages: int = 256        # 1 MiB
    hist_entries: int = 16384
    count_entries: int = 10240
    exit_scan_fds: int = 64


def bpf_source_path() -> Path:
    """bpf/epipe.bpf.c from a source checkout, else the installed copy."""
    here = Path(__file__).resolve().parent.parent / "bpf" / "epipe.bpf.c"
    if here.exists():
        return here
    return Path(str(resources.files("tracer.bpf").joinpath("epipe.bpf.c")))


def source_text() -> str:
    return bpf_source_path().read_text()


def macros(plan: ProbePlan, filters: Filters, opts: ProgramOptions,
           machine: str | None = None) -> dict[str, str]:
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        raise ValueError(f"architecture {machine} is not supported (x86_64, aarch64)")
    m: dict[str, str] = {k: str(v) for k, v in plan.macros().items()}
    for name, nr in _SYSCALLS[machine].items():
        m[f"NR_{name}"] = str(nr)
    m.update(_REGS[machine])
    m["FILTER_PID"] = "1" if filters.pids else "0"
    m["FILTER_LPORT"] = "1" if filters.lports else "0"
    m["FILTER_DPORT"] = "1" if filters.dports else "0"
    m["FILTER_FAMILY"] = str(filters.family)
    if filters.comm:
        m["FILTER_COMM"] = "1"
        m["FILTER_COMM_STR"] = "{" + ",".join(str(b) for b in
                                              filters.comm.encode()[:15]) + ",0}"
    else:
        m["FILTER_COMM"] = "0"
    if filters.cgroup_id is not None:
        m["FILTER_CGROUP"] = "1"
        m["FILTER_CGROUP_ID"] = f"{filters.cgroup_id}ULL"
    else:
        m["FILTER_CGROUP"] = "0"
    if filters.kinds is not None:
        bits = 0
        for k in filters.kinds:
            bits |= 1 << KINDS[k]
        m["FILTER_KINDS"] = str(bits)
    else:
        m["FILTER_KINDS"] = "0"
    m["WANT_STACKS"] = "1" if opts.stacks else "0"
    m["RINGBUF_PAGES"] = str(opts.ringbuf_pages)
    m["HIST_ENTRIES"] = str(opts.hist_entries)
    m["COUNT_ENTRIES"] = str(opts.count_entries)
    m["EXIT_SCAN_FDS"] = str(opts.exit_scan_fds)
    return m


def render(plan: ProbePlan, filters: Filters, opts: ProgramOptions) -> str:
    """The full program text as compiled: macros first, then bpf/epipe.bpf.c."""
    head = "".join(f"#define {k} {v}\n" for k, v in macros(plan, filters, opts).items())
    return f"/* epipe-trace: generated settings */\n{head}\n{source_text()}"
