"""Where epipe-trace's start-up time and peak memory go, phase by phase.

Run by scripts/bench with the venv python and cwd = the checkout:
    python scripts/benchlib/startup_profile.py REPO
It replays what `python -m tracer` does before its ready line (imports,
capabilities.detect, headers.prepare, make_plan, loader.load: the
compile helper's own peak is reported apart, it is another process) using the
tracer's own functions, and prints one JSON object:
    {"phases": [{"phase", "seconds", "vm_hwm_mib", "vm_rss_mib"}...], "total_s": ...}
The tracer's internals may change under it: any failure is reported in
"error" and the phases measured so far are kept.
"""
from __future__ import annotations

import json
import os
import sys
import time

T_PROCESS = time.monotonic()


def mem() -> tuple[float, float]:
    hwm = rss = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return hwm, rss


def main() -> int:
    repo = sys.argv[1] if len(sys.argv) > 1 else os.getcwd()
    sys.path.insert(0, repo)
    phases = []
    out = {"phases": phases}
    t = time.monotonic()

    def mark(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        hwm, rss = mem()
        phases.append({"phase": name, "seconds": now - t, "vm_hwm_mib": hwm, "vm_rss_mib": rss})
        t = now

    try:
        import click  # noqa: F401
        mark("import click")
        from tracer import cli  # noqa: F401
        from tracer import capabilities, headers, loader
        from tracer.plan import make_plan
        from tracer.program import Filters, ProgramOptions, source_text
        mark("import tracer modules")

        # capabilities.detect() once, as the tool does, with its expensive
        # parts timed from inside (wrapped, not called twice)
        import tracer.btf as btf_mod
        sub: dict[str, float] = {}

        def timed(owner, attr, label):
            fn = getattr(owner, attr)

            def wrapper(*a, **k):
                t0 = time.monotonic()
                try:
                    return fn(*a, **k)
                finally:
                    sub[label] = sub.get(label, 0.0) + time.monotonic() - t0
            setattr(owner, attr, wrapper)

        timed(capabilities.BTF, "from_file", "parse BTF (Python)")
        timed(capabilities, "_kallsyms_text", "read /proc/kallsyms")
        timed(capabilities, "_tracepoint_fields", "tracefs format files")
        timed(capabilities, "read_kernel_config", "kernel config")
        timed(capabilities, "probe_fentry", "fentry probe")
        timed(capabilities, "find_or_mount_tracefs", "find tracefs")
        caps = capabilities.detect()
        mark("capabilities.detect()")
        phases[-1]["parts"] = {k: round(v, 4) for k, v in sub.items()}
        del btf_mod

        tree = headers.prepare(caps, cache_dir=headers.DEFAULT_CACHE, roots_text=source_text())
        mark(f"headers.prepare ({'cached' if tree.cached else 'generated'})")
        plan = make_plan(caps)
        mark("make_plan")
        loaded = loader.load(tree, plan, Filters(), ProgramOptions())
        mark("program (cache or compile helper) + maps + load + attach"
             + (" [cached]" if loaded.compiled.cached else " [compiled now]"))
        loaded.open_ring_buffer(lambda *a: 0)
        mark("open ring buffer")
        out["compile_seconds_reported"] = loaded.compile_seconds
        out["compile_helper_peak_kb"] = loaded.compiled.helper_peak_kb
        loaded.detach()
        mark("detach")
    except BaseException as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
    out["total_s"] = time.monotonic() - T_PROCESS
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
