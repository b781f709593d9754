"""`epipe-trace doctor`: kernel facts, header tree, plan, and a real load."""
from __future__ import annotations

import json
import time

import click
from tabulate import tabulate

from . import capabilities, headers
from .loader import LoadError, load
from .plan import OFF, SHARED, UNAVAILABLE, make_plan
from .program import Filters, ProgramOptions, source_text


def run_doctor(as_json: bool, load_program: bool, prefer: str | None,
               header_source: str = "auto", syscalls: bool = False) -> int:
    t0 = time.monotonic()
    caps = capabilities.detect()
    detect_s = time.monotonic() - t0
    plan = make_plan(caps, prefer=prefer, syscalls=syscalls)
    tree, tree_error = None, None
    try:
        tree = headers.prepare(caps, prefer=header_source, roots_text=source_text())
    except headers.HeaderError as e:
        tree_error = str(e)
    load_info: dict = {"attempted": False}
    verdict, why = plan.verdict()
    if tree_error:
        verdict, why = "cannot run", tree_error
    if load_program and tree is not None and verdict != "cannot run":
        t1 = time.monotonic()
        try:
            loaded = load(tree, plan, Filters(), ProgramOptions())
            attached = time.monotonic() - t1
            t2 = time.monotonic()
            loaded.detach()
            load_info = {"attempted": True, "ok": True,
                         "header": ("complete vmlinux.h (the cut one failed)"
                                    if loaded.full_vmlinux else "as prepared"),
                         "compiled": ("cached" if loaded.compiled.cached else "now"),
                         "compile_seconds": round(loaded.compile_seconds, 3),
                         "compile_helper_peak_kb": loaded.compiled.helper_peak_kb,
                         "program_cache_key": loaded.compiled.key,
                         "compile_load_attach_seconds": round(attached, 3),
                         "detach_seconds": round(time.monotonic() - t2, 3)}
        except LoadError as e:
            load_info = {"attempted": True, "ok": False, "error": str(e)}
            verdict, why = "cannot run", f"the program did not load: {str(e).splitlines()[0]}"
    if as_json:
        doc = {"kernel": caps.to_dict(), "detect_seconds": round(detect_s, 3),
               "header_tree": tree.to_dict() if tree else {"error": tree_error},
               "plan": plan.to_list(), "syscall_hooks": plan.uses_syscall_hooks(),
               "load": load_info,
               "verdict": verdict, "why": why}
        click.echo(json.dumps(doc, indent=1))
    else:
        facts = [
            ("kernel", f"{caps.release} ({caps.machine})"),
            ("BTF", caps.btf_path or "absent"),
            ("kernel headers", caps.headers_dir or "absent"),
            ("kprobes", f"{'yes' if caps.kprobes else 'no'}: {caps.kprobes_reason}"),
            ("fentry", f"{'yes' if caps.fentry else 'no'}: {caps.fentry_reason}"),
            ("raw tracepoints", "yes" if caps.raw_tracepoints else "no"),
            ("ring buffer", "yes" if caps.ringbuf else "no"),
            ("tracefs", caps.tracefs or "not mounted and could not be mounted"),
            ("tracepoints found", f"{len(caps.tracepoints)} of {len(capabilities.TRACEPOINTS)}"),
        ]
        if tree:
            facts.append(("header tree", f"{tree.kind}: {tree.path}"))
            facts.append(("header tree time", f"{tree.seconds:.3f} s ("
                          + ("reused cache" if tree.cached and tree.kind == "btf-generated"
                             else "generated now" if tree.kind == "btf-generated" else "real headers")
                          + ")"))
        else:
            facts.append(("header tree", f"none: {tree_error}"))
        click.echo(tabulate(facts, headers=["FACT", "VALUE"], tablefmt="simple"))
        click.echo()
        rows = []
        for c in plan.choices:
            status = ("MISSING: " + c.hook.if_missing if c.mechanism == UNAVAILABLE else
                      "off (--syscalls adds it): " + c.hook.if_missing if c.mechanism == OFF else
                      "ok (served by the report point)" if c.mechanism == SHARED else "ok")
            rows.append((c.hook.name, c.mechanism, c.target or "-", status))
        click.echo(tabulate(rows, headers=["HOOK", "MECHANISM", "TARGET", "STATUS"],
                            tablefmt="simple"))
        missing_tps = [f"{c}:{n}" for c, n in capabilities.TRACEPOINTS
                       if f"{c}:{n}" not in caps.tracepoints]
        if missing_tps:
            click.echo(f"\ntracepoints absent here: {', '.join(missing_tps)}")
        click.echo()
        if load_info.get("attempted"):
            if load_info["ok"]:
                if load_info["compiled"] == "cached":
                    click.echo("program: compiled before, read from the cache (no compiler "
                               "in this process)")
                else:
                    click.echo(f"program: compiled now by a helper process in "
                               f"{load_info['compile_seconds']:.3f} s (helper peak RSS "
                               f"{load_info['compile_helper_peak_kb'] / 1024:.0f} MB); cached "
                               "for the next start")
                click.echo(f"compile + load + attach: {load_info['compile_load_attach_seconds']:.3f} s; "
                           f"detach: {load_info['detach_seconds']:.3f} s")
            else:
                click.echo(f"load failed: {load_info['error']}")
        if plan.uses_syscall_hooks():
            click.echo("syscall hooks: on (every syscall on the host pays the kernel's "
                       "syscall-tracepoint slow path while tracing)")
        else:
            click.echo("syscall hooks: none (no cost on the syscall path; --syscalls "
                       "for exact accept time, shutdown() caller and closing readers)")
        click.echo(f"{verdict}: {why}")
    return 0 if verdict in ("ready", "degraded") else 1
