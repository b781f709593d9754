"""Per-BPF-program cost: run_cnt and run_time_ns of the tracer's programs.

The kernel counts them only while kernel.bpf_stats_enabled=1 (which itself
adds two clock reads per program run, so the throughput runs never have it
on). The counters are read from /proc/<tracer>/fdinfo/<fd> of each program fd
(prog_id, run_time_ns, run_cnt); names come from `bpftool prog show --json`
when bpftool is there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


class StatsEnabled:
    """Context manager: bpf_stats_enabled=1 inside, the old value restored after."""

    def __init__(self):
        self.old: str | None = None
        self.ok = False

    def __enter__(self):
        try:
            with open(SYSCTL) as f:
                self.old = f.read().strip()
            with open(SYSCTL, "w") as f:
                f.write("1")
            self.ok = True
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            try:
                with open(SYSCTL, "w") as f:
                    f.write(self.old)
            except OSError:
                pass
        return False


def snapshot(pid: int) -> dict[int, dict]:
    """{prog_id: {"run_time_ns", "run_cnt", "tp"}} for every BPF program fd of pid.

    Program fds carry run_time_ns/run_cnt; raw-tracepoint link fds carry the
    same prog_id and the tracepoint's name (tp_name)."""
    out: dict[int, dict] = {}
    tps: dict[int, str] = {}
    d = f"/proc/{pid}/fdinfo"
    try:
        fds = os.listdir(d)
    except OSError:
        return out
    for n in fds:
        try:
            with open(os.path.join(d, n)) as f:
                kv = {}
                for line in f:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        kv[k.strip()] = v.strip()
        except OSError:
            continue
        if "prog_id" not in kv:
            continue
        pid_ = int(kv["prog_id"])
        if "tp_name" in kv:
            tps[pid_] = kv["tp_name"]
        if "run_time_ns" in kv:
            out[pid_] = {"run_time_ns": int(kv["run_time_ns"]), "run_cnt": int(kv.get("run_cnt", 0))}
    for pid_, tp in tps.items():
        if pid_ in out:
            out[pid_]["tp"] = tp
    return out


def names(ids) -> dict[int, str]:
    ids = set(ids)
    bpftool = shutil.which("bpftool") or ("/usr/sbin/bpftool" if os.path.exists("/usr/sbin/bpftool") else None)
    if not bpftool:
        return {}
    try:
        r = subprocess.run([bpftool, "prog", "show", "--json"], capture_output=True,
                           text=True, timeout=30)
        progs = json.loads(r.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}
    return {p["id"]: p.get("name", "?") for p in progs if p.get("id") in ids}


def diff(before: dict[int, dict], after: dict[int, dict], ids_names: dict[int, str]) -> list[dict]:
    rows = []
    for pid_, a in after.items():
        b = before.get(pid_, {"run_time_ns": 0, "run_cnt": 0})
        cnt = a["run_cnt"] - b["run_cnt"]
        ns = a["run_time_ns"] - b["run_time_ns"]
        name = ids_names.get(pid_) or a.get("tp") or f"prog {pid_}"
        rows.append({"id": pid_, "name": name,
                     "run_cnt": cnt, "run_time_ns": ns,
                     "avg_ns": (ns / cnt) if cnt else None})
    rows.sort(key=lambda r: -r["run_time_ns"])
    return rows
