"""Command line: ``epipe-trace [trace options]``, ``epipe-trace doctor``.

Exit codes: 0 normal end, 1 runtime failure, 2 usage or environment error
(bad option, not root, no BTF and no headers...). Errors are one line on
stderr, never a traceback.
"""
from __future__ import annotations

import json
import os
import sys
import time

import click

from . import __version__

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

TRACE_EPILOG = """\b
Examples:
  epipe-trace                       # every broken pipe on the host
  epipe-trace -p 1234 -T            # one process, with wall-clock times
  epipe-trace -p 1234,1250 --timeline
  epipe-trace -L 8080 --json | jq .cause
  epipe-trace -D 5432 -d 60         # peers on port 5432, for one minute
  epipe-trace --type pipe -c myjob    # pipes and FIFOs of one program
  epipe-trace doctor                # what this kernel offers, what will be used
  epipe-trace -p 1234 --syscalls    # + exact accept-queue wait, shutdown() calls

\b
Cost: where the kernel has sock:sock_send_length (6.3+) no syscall is hooked;
failures are caught where sock_sendmsg() returns them and, for pipes, where
their SIGPIPE is generated. --syscalls hooks syscalls too (every syscall on the
host then pays the kernel's slow path) for the facts only they give: the exact
accept-queue wait, the shutdown() call and its how, a reader that close()d.

\b
Causes (JSON "cause"):
  accepted_after_peer_closed  the socket sat in the accept queue; the peer had
                              closed before accept() (CLOSE_WAIT), our write got a RST
  peer_reset_after_close      peer had sent FIN, we wrote, it answered RST
  reset_while_established     RST in ESTABLISHED: ECONNRESET first, then EPIPE
  own_shutdown                we called shutdown(SHUT_WR/SHUT_RDWR) earlier
  connection_dead             timeout/abort (sk_err ETIMEDOUT, ECONNABORTED...)
  peer_closed / no_readers    UNIX peer closed / pipe without readers
\b
SIGPIPE fates: suppressed, ignored, blocked, caught, fatal, not_raised.
Exit codes: 0 done, 1 runtime failure, 2 usage or environment error.
"""


class UsageFailure(Exception):
    """Bad input or environment: one line on stderr, exit 2."""


def fail(msg: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"epipe-trace: {msg}", err=True)
    sys.exit(code)


def parse_int_list(value: str | None, what: str, lo: int, hi: int) -> list[int]:
    if not value:
        return []
    out = []
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit() or not lo <= int(part) <= hi:
            raise click.BadParameter(f"{part!r} is not a {what} ({lo}-{hi}); "
                                     f"give a comma list like 80,443")
        out.append(int(part))
    return out


class DefaultGroup(click.Group):
    """`epipe-trace -p 1` means `epipe-trace trace -p 1`."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h",
                                                                          "--version")):
            args = ["trace", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Run 'epipe-trace trace --help' for the tracing options.")
@click.version_option(__version__, prog_name="epipe-trace")
def main():
    """Explain every "Broken pipe" on this host as it happens.

    For each send that fails with EPIPE (or the ECONNRESET that precedes one)
    it shows the socket, its TCP state history, whether the peer sent a RST
    and in which state, whether we had shut down our side, the kernel path,
    and what became of the SIGPIPE. Needs root (CAP_BPF + CAP_PERFMON, or
    CAP_SYS_ADMIN).
    """


CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def effective_caps() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def missing_privileges(caps: int) -> list[str]:
    """What keeps this process from loading tracing programs ([] when nothing).

    CAP_SYS_ADMIN is enough everywhere; since 5.8, CAP_BPF with CAP_PERFMON
    also is. Reading /proc/kallsyms addresses for stacks needs one of them too.
    """
    if caps & (1 << CAP_SYS_ADMIN):
        return []
    missing = [name for bit, name in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON"))
               if not caps & (1 << bit)]
    return missing


def _require_root() -> None:
    missing = missing_privileges(effective_caps())
    if missing:
        fail(f"missing privilege {' and '.join(missing)} (or CAP_SYS_ADMIN): loading BPF "
             "tracing programs needs them; run it as root, e.g. with sudo")


@main.command("trace", epilog=TRACE_EPILOG)
@click.option("-p", "--pid", "pids", metavar="PID[,PID...]", help="Trace only these processes.")
@click.option("-c", "--comm", metavar="NAME", help="Trace only processes with this name.")
@click.option("-L", "--lport", metavar="PORT[,PORT...]", help="Only TCP sockets with these local ports.")
@click.option("-D", "--dport", metavar="PORT[,PORT...]", help="Only TCP sockets with these remote ports.")
@click.option("-4", "--ipv4", is_flag=True, help="Only IPv4 TCP.")
@click.option("-6", "--ipv6", is_flag=True, help="Only IPv6 TCP.")
@click.option("--cgroup", metavar="PATH", type=click.Path(),
              help="Only processes in this cgroup v2 directory (one container).")
@click.option("--type", "types", metavar="TYPES", default="tcp,unix,pipe",
              help="Kinds to trace, comma list of tcp, unix, pipe (pipe includes FIFOs). "
                   "Default: all.")
@click.option("-T", "--time", "show_time", is_flag=True, help="Print wall-clock time (HH:MM:SS.mmm).")
@click.option("-t", "--timestamp", "show_ts", is_flag=True, help="Print seconds since start.")
@click.option("--timeline", is_flag=True, help="Print the socket's history under each event.")
@click.option("--json", "as_json", is_flag=True, help="Newline-delimited JSON, one object per event.")
@click.option("--stack", is_flag=True, help="Add the kernel and user stacks of each failing send.")
@click.option("-d", "--duration", type=click.FloatRange(min=0.001), metavar="SECONDS",
              help="Stop after this many seconds.")
@click.option("--prefer", type=click.Choice(["kprobe", "fentry", "tracepoint"]),
              help="Prefer this mechanism where a hook has it (default: kprobe, fentry, tracepoint).")
@click.option("--headers", "header_source", type=click.Choice(["auto", "kernel", "btf"]),
              default="auto", show_default=True,
              help="Kernel headers for bcc: real ones, or generated from BTF.")
@click.option("--buffer-pages", type=int, default=256, show_default=True, metavar="N",
              help="Ring buffer size in pages (a power of two). When it fills, event lines "
                   "are dropped and counted; the summary stays exact.")
@click.option("--syscalls", is_flag=True,
              help="Also hook syscalls (report at the syscall's exit; exact accept-queue "
                   "wait, shutdown() caller and how, the pipe reader that closed its end). "
                   "Costs every syscall on the host; off by default where the kernel has "
                   "sock:sock_send_length, always on where it has not.")
@click.option("--ebpf", is_flag=True, hidden=True, help="Print the BPF program and exit.")
def trace_cmd(pids, comm, lport, dport, ipv4, ipv6, cgroup, types, show_time, show_ts,
              timeline, as_json, stack, duration, prefer, syscalls, header_source,
              buffer_pages, ebpf):
    """Trace broken pipes (the default command)."""
    from .program import Filters, ProgramOptions
    from .session import Session, SessionOptions, pid_alive

    if ipv4 and ipv6:
        raise click.UsageError("-4 and -6 exclude each other; give one, or neither for both")
    if show_time and show_ts:
        raise click.UsageError("-T and -t exclude each other")
    if buffer_pages < 1 or buffer_pages & (buffer_pages - 1) or buffer_pages > 65536:
        raise click.BadParameter(f"{buffer_pages} is not a power of two from 1 to 65536",
                                 param_hint="--buffer-pages")
    pid_list = parse_int_list(pids, "process id", 1, 2**22)
    kinds = set()
    for t in (x.strip() for x in types.split(",") if x.strip()):
        if t not in ("tcp", "unix", "pipe"):
            raise click.BadParameter(f"unknown type {t!r}; choose from tcp, unix, pipe",
                                     param_hint="--type")
        kinds |= {"pipe", "fifo"} if t == "pipe" else {t}
    if not kinds:
        raise click.BadParameter("give at least one of tcp, unix, pipe", param_hint="--type")
    filters = Filters(
        pids=pid_list, comm=comm,
        lports=parse_int_list(lport, "port", 1, 65535),
        dports=parse_int_list(dport, "port", 1, 65535),
        family=2 if ipv4 else 10 if ipv6 else 0,
        kinds=None if kinds == {"tcp", "unix", "pipe", "fifo"} else kinds,
    )
    if (ipv4 or ipv6 or filters.lports or filters.dports) and filters.kinds is None:
        filters.kinds = {"tcp"}
    if cgroup:
        try:
            filters.cgroup_id = os.stat(cgroup).st_ino
        except OSError as e:
            raise click.BadParameter(f"{cgroup}: {e.strerror}; give a cgroup v2 directory "
                                     "such as /sys/fs/cgroup/system.slice/x.service",
                                     param_hint="--cgroup")
        if not os.path.isdir(cgroup):
            raise click.BadParameter(f"{cgroup} is not a directory", param_hint="--cgroup")
        if not _on_cgroup2(cgroup):
            raise click.BadParameter(f"{cgroup} is not on a cgroup v2 file system; give a "
                                     "directory under the cgroup2 mount "
                                     f"({_cgroup2_mounts() or 'none mounted'})",
                                     param_hint="--cgroup")
    for p in pid_list:
        if not pid_alive(p):
            fail(f"process {p} does not exist (or has exited); check the PID with 'ps -p {p}'")
    opts = SessionOptions(filters=filters, program=ProgramOptions(stacks=stack,
                                                                  ringbuf_pages=buffer_pages),
                          json=as_json,
                          time_mode="time" if show_time else "timestamp" if show_ts else None,
                          timeline=timeline, duration=duration, prefer=prefer,
                          syscalls=syscalls, header_source=header_source)
    _require_root()
    caps, tree, plan = _prepare(opts)
    if ebpf:
        from .program import render
        click.echo(render(plan, filters, opts.program))
        return
    verdict, why = plan.verdict()
    if verdict == "cannot run":
        fail(f"cannot trace on this kernel: {why}")
    if verdict == "degraded":
        click.echo(f"epipe-trace: degraded: {why} (see 'epipe-trace doctor')", err=True)
    if pid_list and not any(pid_alive(p) for p in pid_list):
        fail("every target process exited during start-up")
    sess = Session(opts)

    def ready(_sess):
        # after attach: scripts and tests wait for this line on stderr
        click.echo(f"epipe-trace: tracing broken pipes{_filter_words(filters)}; "
                   "Ctrl-C to stop", err=True)

    from .session import TargetsGone
    try:
        code = sess.run(plan, tree, ready_cb=ready)
        # done (summary out, probes detached): a Ctrl-C or SIGTERM from now
        # on must not turn the exit into death by signal. Python resets its
        # own SIGINT handler to the default action while finalizing; an
        # ignored signal stays ignored.
        _ignore_stop_signals()
    except TargetsGone as e:
        fail(f"process {e} exited while the probes were being loaded; nothing was traced")
    except BrokenPipeError:
        # our reader went away (| head): a normal end. The session has already
        # detached; click would turn this into exit 1, so end here.
        _stdout_to_devnull()
        code = EXIT_OK
    sys.exit(code)


def _ignore_stop_signals() -> None:
    import signal
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _cgroup2_mounts() -> list[str]:
    try:
        return [ln.split()[1] for ln in open("/proc/mounts") if ln.split()[2:3] == ["cgroup2"]]
    except OSError:
        return []


def _on_cgroup2(path: str) -> bool:
    """bpf_get_current_cgroup_id() is the cgroup v2 id: a v1 directory's
    inode number would silently match nothing."""
    real = os.path.realpath(path)
    return any(real == m or real.startswith(m.rstrip("/") + "/") for m in _cgroup2_mounts())


def _filter_words(f) -> str:
    words = []
    if f.pids:
        words.append("pid " + ",".join(map(str, f.pids)))
    if f.comm:
        words.append(f"comm {f.comm}")
    if f.lports:
        words.append("local port " + ",".join(map(str, f.lports)))
    if f.dports:
        words.append("remote port " + ",".join(map(str, f.dports)))
    return f" ({'; '.join(words)})" if words else ""


def _prepare(opts):
    from .headers import HeaderError
    from .session import prepare
    try:
        caps, tree, plan = prepare(opts)
    except HeaderError as e:
        fail(str(e))
    if caps.tracefs is None:
        # without tracefs no tracepoint can be found or attached: every hook
        # but the raw sys_exit would be 'missing', which would hide the cause
        fail("tracefs is not mounted and could not be mounted at /sys/kernel/tracing: "
             "mount it (mount -t tracefs tracefs /sys/kernel/tracing) or run with "
             "CAP_SYS_ADMIN")
    return caps, tree, plan


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for machines.")
@click.option("--no-load", is_flag=True, help="Skip compiling and loading the program.")
@click.option("--prefer", type=click.Choice(["kprobe", "fentry", "tracepoint"]),
              help="Plan as if this mechanism were preferred.")
@click.option("--syscalls", is_flag=True, help="Plan as `trace --syscalls` would.")
@click.option("--headers", "header_source", type=click.Choice(["auto", "kernel", "btf"]),
              default="auto", show_default=True)
def doctor_cmd(as_json, no_load, prefer, syscalls, header_source):
    """Show what this kernel offers and what epipe-trace will attach.

    Reports kernel facts (BTF, headers, kprobes, fentry, tracepoints), the
    header tree bcc will use (and how long it took), the probe plan (hook ->
    mechanism), then compiles, loads, attaches and detaches the planned
    program and reports the time. Final line: ready, degraded (what is lost)
    or cannot run (why). Exit 0 ready or degraded, 1 cannot run, 2 usage.
    """
    from .doctor import run_doctor
    _require_root()
    sys.exit(run_doctor(as_json=as_json, load_program=not no_load, prefer=prefer,
                        header_source=header_source, syscalls=syscalls))


@main.command("repro")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True),
              metavar="FILE", help="Write the kernel fingerprint to FILE ('-' for stdout).")
@click.option("--prefer", type=click.Choice(["kprobe", "fentry", "tracepoint"]),
              help="Prefer this mechanism where a hook has it.")
@click.option("--syscalls", is_flag=True, help="Trace as `trace --syscalls` does.")
def repro_cmd(json_file, prefer, syscalls):
    """Run the fixed broken-pipe scenarios on loopback, traced, and record a
    kernel fingerprint: per scenario the send results, signals, state
    transitions, kernel path and verdicts. Exit 0 when every verdict is the
    expected one, 1 otherwise."""
    from .repro import run_repro
    _require_root()
    doc = run_repro(prefer=prefer, syscalls=syscalls)
    text = json.dumps(doc, indent=1)
    if json_file == "-":
        click.echo(text)
    elif json_file:
        with open(json_file, "w") as f:
            f.write(text + "\n")
    rows = [(name, ",".join(f["causes"]) or "-", ",".join(sorted(set(f["sigpipe"]))) or "-",
             "yes" if f["as_expected"] else "NO") for name, f in doc["scenarios"].items()]
    from tabulate import tabulate
    click.echo(tabulate(rows, headers=["SCENARIO", "CAUSE", "SIGPIPE", "AS EXPECTED"]),
               err=json_file == "-")
    sys.exit(EXIT_OK if all(f["as_expected"] for f in doc["scenarios"].values()) else EXIT_RUNTIME)


@main.command("compare")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Rows as JSON for machines.")
@click.option("--diff", "only_diff", is_flag=True, help="Show only the rows that differ.")
def compare_cmd(files, as_json, only_diff):
    """Put fingerprints from `repro --json` side by side. Exit 0 when the
    scenario facts are equal everywhere, 1 when they differ (plan differences
    are shown but expected between kernels)."""
    from .repro import compare, compare_table
    if len(files) < 2:
        raise click.UsageError("give at least two fingerprint files")
    docs = []
    for f in files:
        try:
            with open(f) as fh:
                docs.append(json.load(fh))
        except ValueError as e:
            raise click.BadParameter(f"{f} is not a fingerprint (invalid JSON: {e})")
    names = [d.get("kernel", {}).get("release", f) for d, f in zip(docs, files)]
    if len(set(names)) < len(names):
        names = list(files)
    rows, differ = compare(docs, names)
    if as_json:
        click.echo(json.dumps({"kernels": names, "differ": differ, "rows": rows}, indent=1))
    else:
        click.echo(compare_table(rows, names, only_diff))
        click.echo("\n" + ("facts differ (rows marked *)" if differ else "all scenario facts equal"))
    sys.exit(EXIT_RUNTIME if differ else EXIT_OK)


def entry() -> None:
    """Console-script entry: map every expected failure to one line."""
    from .headers import HeaderError
    from .loader import LoadError
    try:
        main(prog_name="epipe-trace", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(EXIT_OK)          # Ctrl-C before tracing started: nothing attached
    except click.UsageError as e:
        msg = e.format_message()
        hint = f" (try '{e.ctx.command_path} --help')" if e.ctx else ""
        click.echo(f"epipe-trace: {msg}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as e:
        click.echo(f"epipe-trace: {e.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except HeaderError as e:
        click.echo(f"epipe-trace: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except LoadError as e:
        click.echo(f"epipe-trace: {e}", err=True)
        sys.exit(EXIT_RUNTIME)
    except BrokenPipeError:
        _stdout_to_devnull()        # our reader went away (| head)
        sys.exit(EXIT_OK)
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 -- the promise is: no traceback, ever
        if os.environ.get("EPIPE_TRACE_DEBUG"):
            raise
        click.echo(f"epipe-trace: internal error: {type(e).__name__}: {e} "
                   "(set EPIPE_TRACE_DEBUG=1 for a traceback)", err=True)
        sys.exit(EXIT_RUNTIME)
