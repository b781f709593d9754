"""Numbers -> statistics, goals and tables for scripts/bench."""
from __future__ import annotations

import statistics

from tabulate import tabulate

WORKLOADS = {
    "send": ("send path", "sends/s", "64-byte send()s on one loopback TCP connection"),
    "send1": ("send path, 1 thread", "sends/s", "64-byte send()s drained by the same thread"),
    "churn": ("connection churn", "conns/s", "connect + 16-byte write + close, loopback"),
    "syscall": ("bare syscall (getppid)", "calls/s", "the tax on every syscall of the host"),
    "storm": ("EPIPE storm", "attempts/s", "send() after shutdown(SHUT_WR), SIGPIPE ignored"),
}
VARIANTS = ("untraced", "traced", "traced_pid", "traced_syscalls", "strace", "floor")
VARIANT_TITLES = {
    "untraced": "untraced",
    "traced": "epipe-trace (default)",
    "traced_pid": "epipe-trace -p PID",
    "traced_syscalls": "epipe-trace --syscalls",
    "strace": "strace -f",
    "floor": "empty program on sock_send_length",
}
MIB = 1024.0

GOALS = {
    "send_ratio": 0.97,
    "churn_ratio": 0.95,
    "ready_warm_s": 1.5,
    "ready_cold_s": 4.0,
    "rss_mib": 120.0,
}


def spread(values: list[float]) -> dict | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def fmt_spread(s: dict | None, fmt=lambda x: f"{x:.3f}") -> str:
    if not s:
        return "n/a"
    return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"


def compute(data: dict) -> dict:
    """Medians, paired ratios, storm exactness, goals. Stored into data['results']."""
    res: dict = {"throughput": {}, "startup": {}, "storm": {}, "goals": []}
    runs = [r for r in data["runs"] if r.get("ok") and not r.get("stalled")]
    res["stalled_runs"] = [{k: r.get(k) for k in ("round", "workload", "variant", "seconds",
                                                  "cpu_self", "majflt", "host_cpu")}
                           for r in data["runs"] if r.get("ok") and r.get("stalled")]
    res["failed_runs"] = [{k: r.get(k) for k in ("round", "workload", "variant", "error")}
                          for r in data["runs"] if not r.get("ok")]
    for wl in data["meta"]["workloads"]:
        by_round: dict[int, dict[str, float]] = {}
        by_round_cpu: dict[int, dict[str, float]] = {}
        for r in runs:
            if r["workload"] == wl:
                by_round.setdefault(r["round"], {})[r["variant"]] = r["rate"]
                if r.get("rate_cpu"):
                    by_round_cpu.setdefault(r["round"], {})[r["variant"]] = r["rate_cpu"]
        entry = {}
        for v in VARIANTS:
            rates = [d[v] for d in by_round.values() if v in d]
            entry[v] = {"rate": spread(rates),
                        "rate_cpu": spread([d[v] for d in by_round_cpu.values() if v in d])}
            if v != "untraced":
                ratios = [d[v] / d["untraced"] for d in by_round.values()
                          if v in d and d.get("untraced")]
                entry[v]["ratio"] = spread(ratios)
                entry[v]["ratio_cpu"] = spread([d[v] / d["untraced"] for d in by_round_cpu.values()
                                                if v in d and d.get("untraced")])
                entry[v]["added_ns_cpu"] = spread([1e9 / d[v] - 1e9 / d["untraced"]
                                                   for d in by_round_cpu.values()
                                                   if v in d and d.get("untraced")])
        res["throughput"][wl] = entry

    for kind in ("warm", "cold"):
        st = [s for s in data["startup"] if s["kind"] == kind and s.get("ready_s") is not None]
        res["startup"][kind] = {
            "ready_s": spread([s["ready_s"] for s in st]),
            "cpu_ready_s": spread([s.get("cpu_ready_s") for s in st]),
            "stop_s": spread([s["stop_s"] for s in st]),
            "vm_hwm_mib": spread([s["vm_hwm_kb"] / MIB for s in st if s.get("vm_hwm_kb")]),
            "helper_hwm_mib": spread([s["helper_hwm_kb"] / MIB for s in st if s.get("helper_hwm_kb")]),
            "compiled": sorted({s.get("compiled") or "?" for s in st}),
        }
    hwms = [(s["vm_hwm_kb"], f"start-up {s['kind']}") for s in data["startup"] if s.get("vm_hwm_kb")]
    hwms += [(r["tracer"]["vm_hwm_kb"], f"{r['workload']} {r['variant']}") for r in data["runs"]
             if r.get("ok") and r.get("tracer") and r["tracer"].get("vm_hwm_kb")]
    peak = max(hwms) if hwms else None
    res["rss_peak"] = {"vm_hwm_mib": peak[0] / MIB, "where": peak[1]} if peak else None

    storm_rows = []
    for r in (r for r in data["runs"] if r.get("ok")):   # exactness does not care about stalls
        if r["workload"] != "storm" or r["variant"] not in ("traced", "traced_pid"):
            continue
        t = r["tracer"]
        total = t.get("summary_total")
        storm_rows.append({
            "round": r["round"], "variant": r["variant"], "epipe": r["epipe"],
            "attempts": r["ops"], "summary_total": total,
            "exact": (total == r["epipe"]) if r["variant"] == "traced_pid" and total is not None else None,
            "covers": (total is not None and total >= r["epipe"]),
            "lost_events": t.get("lost_events"), "lost_lines": t.get("lost_lines"),
            "lost_line_total": t.get("lost_line_total"), "broken_pipe_lines": t.get("fail_lines"),
            "lost_lines_midrun": t.get("lost_lines_midrun"),
            "uncounted": t.get("uncounted"), "by_cause": t.get("by_cause"),
            "summary_seen": t.get("summary_seen"),
        })
    res["storm"]["rows"] = storm_rows
    pid_rows = [x for x in storm_rows if x["variant"] == "traced_pid"]
    res["storm"]["exact_all"] = bool(pid_rows) and all(x["exact"] for x in pid_rows)
    res["storm"]["exact_rounds"] = sum(1 for x in pid_rows if x["exact"])
    res["storm"]["pid_rounds"] = len(pid_rows)

    g = res["goals"]

    def goal(name, target, measured, ok, shown):
        g.append({"goal": name, "target": target, "measured": measured,
                  "status": "n/a" if ok is None else ("PASS" if ok else "MISS"), "shown": shown})

    for wl, key, label in (("send", "send_ratio", "send path traced/untraced"),
                           ("churn", "churn_ratio", "connection churn traced/untraced")):
        if wl not in res["throughput"]:
            continue
        s = res["throughput"][wl]["traced"].get("ratio")
        sc = res["throughput"][wl]["traced"].get("ratio_cpu")
        m = s["median"] if s else None
        mc = sc["median"] if sc else None
        goal(label + " (throughput)", f">= {GOALS[key]:.2f}", m,
             None if m is None else m >= GOALS[key], fmt_spread(s) + " default, median")
        goal(label + " (per CPU-second)", f">= {GOALS[key]:.2f}", mc,
             None if mc is None else mc >= GOALS[key], fmt_spread(sc) + " default, median")
    for kind, key in (("warm", "ready_warm_s"), ("cold", "ready_cold_s")):
        s = res["startup"][kind]["ready_s"]
        m = s["median"] if s else None
        c = res["startup"][kind]["cpu_ready_s"]
        goal(f"ready ({kind} cache)", f"<= {GOALS[key]:.1f} s", m,
             None if m is None else m <= GOALS[key], fmt_spread(s, lambda x: f"{x:.2f} s")
             + (f"; CPU {c['median']:.2f} s" if c else ""))
    pk = res["rss_peak"]
    goal("peak RSS of the tracing process (VmHWM, any run)", f"<= {GOALS['rss_mib']:.0f} MiB",
         pk and pk["vm_hwm_mib"], None if not pk else pk["vm_hwm_mib"] <= GOALS["rss_mib"],
         f"{pk['vm_hwm_mib']:.1f} MiB ({pk['where']})" if pk else "n/a")
    hh = res["startup"]["cold"].get("helper_hwm_mib")
    goal("peak RSS of the compile helper (cold cache only, ~0.5 s)", f"<= {GOALS['rss_mib']:.0f} MiB",
         hh and hh["max"], None if not hh else hh["max"] <= GOALS["rss_mib"],
         fmt_spread(hh, lambda x: f"{x:.1f} MiB") if hh else "n/a")
    if "storm" in data["meta"]["workloads"]:
        goal("storm summary exact (-p PID --json)", "total == EPIPEs counted, every round",
             res["storm"]["exact_all"], res["storm"]["exact_all"] if pid_rows else None,
             f"{res['storm']['exact_rounds']}/{res['storm']['pid_rounds']} rounds exact")
    if data.get("ablation"):
        ab: dict = {}
        arows = [r for r in data["ablation"] if r.get("ok") and not r.get("stalled")]
        for wl in data["meta"]["workloads"]:
            base = {r["round"]: r["rate"] for r in arows
                    if r["workload"] == wl and r["variant"] == "untraced"}
            base_cpu = {r["round"]: r.get("rate_cpu") for r in arows
                        if r["workload"] == wl and r["variant"] == "untraced"}
            labels = []
            for r in arows:
                if r["workload"] == wl and r["variant"] == "ablate" and r["label"] not in labels:
                    labels.append(r["label"])
            entries = []
            for lab in labels:
                ratios = [r["rate"] / base[r["round"]] for r in arows
                          if r["workload"] == wl and r.get("label") == lab and base.get(r["round"])]
                ratios_cpu = [r["rate_cpu"] / base_cpu[r["round"]] for r in arows
                              if r["workload"] == wl and r.get("label") == lab
                              and base_cpu.get(r["round"]) and r.get("rate_cpu")]
                added = [1e9 / r["rate_cpu"] - 1e9 / base_cpu[r["round"]] for r in arows
                         if r["workload"] == wl and r.get("label") == lab
                         and base_cpu.get(r["round"]) and r.get("rate_cpu")]
                entries.append({"label": lab, "ratio": spread(ratios),
                                "ratio_cpu": spread(ratios_cpu), "added_ns_cpu": spread(added)})
            if entries:
                for key, dkey in (("ratio", "delta"), ("ratio_cpu", "delta_cpu")):
                    ref = entries[0][key]["median"] if entries[0][key] else None
                    for e in entries:
                        e[dkey] = (e[key]["median"] - ref) if (e[key] and ref is not None
                                                               and e is not entries[0]) else None
                ab[wl] = entries
        res["ablation"] = ab
    data["results"] = res
    return res


def render(data: dict) -> str:
    res = data["results"]
    meta = data["meta"]
    out = []
    out.append(f"epipe-trace benchmark: {meta['rounds']} rounds x {meta['seconds']:g} s per run, "
               f"kernel {meta['kernel']}, {meta['cpus']} CPUs")
    out.append(f"load average before/after: {meta['load_before']} / {meta.get('load_after')}; "
               + (f"qemu processes seen during the run: {meta['qemu_seen']} (numbers taken UNDER LOAD)"
                  if meta.get("qemu_seen") else "no qemu seen"))
    out.append("")

    rows = []
    for wl, e in res["throughput"].items():
        title, unit, _ = WORKLOADS[wl]
        row = [title, fmt_spread(e["untraced"]["rate"], fmt_rate) + " " + unit]
        for v in ("traced", "traced_pid", "traced_syscalls", "strace", "floor"):
            row.append(fmt_spread(e[v].get("ratio")))
        rows.append(row)
    out.append("Throughput: untraced rate, and ratio traced/untraced paired per round; "
               "median (min–max)")
    out.append(tabulate(rows, headers=["workload", "untraced", "epipe-trace (default)",
                                       "epipe-trace -p PID", "--syscalls", "strace -f -Z",
                                       "floor: empty program on the hook"],
                        tablefmt="github"))
    out.append("")
    rows = []
    for wl, e in res["throughput"].items():
        title, unit, _ = WORKLOADS[wl]
        row = [title, fmt_spread(e["untraced"]["rate_cpu"], fmt_rate) + f" ops/CPU-s"]
        for v in ("traced", "traced_pid", "traced_syscalls", "strace", "floor"):
            row.append(fmt_spread(e[v].get("ratio_cpu")))
        a = e["traced"].get("added_ns_cpu")
        row.append(f"{a['median']:.0f}" if a else "n/a")
        rows.append(row)
    out.pop()   # the blank line; notes below belong to the table
    if res.get("stalled_runs"):
        out.append(f"excluded as stalled ({len(res['stalled_runs'])}): the loop overshot its deadline, "
                   "i.e. the process got no CPU for a while: "
                   + "; ".join(f"r{x['round']} {x['workload']} {x['variant']} {x['seconds']:.2f} s "
                               f"(CPU {x['cpu_self']:.2f} s)" for x in res["stalled_runs"]))
    if res.get("failed_runs"):
        out.append(f"FAILED runs ({len(res['failed_runs'])}): "
                   + "; ".join(f"r{x['round']} {x['workload']} {x['variant']}: {x['error']}"
                               for x in res["failed_runs"]))
    out.append("")
    out.append("Same runs per CPU-second of the workload (its own + its peer process's user+sys "
               "time): robust to other load on the machine; strace's own CPU is not included")
    out.append(tabulate(rows, headers=["workload", "untraced", "epipe-trace (default)",
                                       "epipe-trace -p PID", "--syscalls", "strace -f -Z",
                                       "floor", "CPU ns added per op (default)"], tablefmt="github"))
    out.append("")

    rows = []
    for kind in ("warm", "cold"):
        s = res["startup"][kind]
        rows.append([f"{kind} cache", fmt_spread(s["ready_s"], lambda x: f"{x:.2f}"),
                     fmt_spread(s["cpu_ready_s"], lambda x: f"{x:.2f}"),
                     fmt_spread(s["stop_s"], lambda x: f"{x:.2f}"),
                     fmt_spread(s["vm_hwm_mib"], lambda x: f"{x:.1f}"),
                     "/".join(s.get("compiled") or []),
                     fmt_spread(s.get("helper_hwm_mib"), lambda x: f"{x:.1f}")])
    out.append("Start-up: launch of `python -m tracer --json` to the ready line on stderr; "
               "stop = SIGINT to exit (summary + detach)")
    out.append(tabulate(rows, headers=["start", "ready (s)", "tool CPU to ready (s)",
                                       "stop (s)", "VmHWM (MiB)", "program",
                                       "compile helper VmHWM (MiB)"],
                        tablefmt="github"))
    pk = res.get("rss_peak")
    if pk:
        out.append(f"peak VmHWM of the tool over every run: {pk['vm_hwm_mib']:.1f} MiB ({pk['where']})")
    out.append("")

    if res["storm"]["rows"]:
        rows = []
        for x in res["storm"]["rows"]:
            rows.append([x["round"], VARIANT_TITLES[x["variant"]], x["epipe"], x["summary_total"],
                         {True: "yes", False: "NO", None: "-"}[x["exact"]],
                         x["lost_events"], x["lost_lines_midrun"],
                         f"{x['lost_lines']} ({x['lost_line_total']})",
                         x["broken_pipe_lines"], x["uncounted"]])
        out.append("EPIPE storm: EPIPEs counted by the workload vs the tool's exit summary "
                   "(lost = events dropped from the ring buffer)")
        out.append(tabulate(rows, headers=["round", "tracer", "EPIPEs", "summary total", "exact",
                                           "lost_events", "lost lines mid-storm",
                                           "lost lines at end (sum)", "event lines",
                                           "uncounted"], tablefmt="github"))
        causes = {}
        for x in res["storm"]["rows"]:
            if x["variant"] == "traced_pid" and x["by_cause"]:
                for k, v in x["by_cause"].items():
                    causes[k] = causes.get(k, 0) + v
        if causes:
            out.append("storm causes named by the tool (-p runs, summed): "
                       + ", ".join(f"{k}={v}" for k, v in causes.items()))
        lossy = [x for x in res["storm"]["rows"] if (x["lost_events"] or 0) > 0]
        at_end = sum(1 for x in lossy if x["lost_lines"] > 0)
        mid = sum(1 for x in lossy if (x["lost_lines_midrun"] or 0) > 0)
        matches = sum(1 for x in lossy if x["lost_line_total"] == x["lost_events"])
        out.append(f"loss: {len(lossy)}/{len(res['storm']['rows'])} traced storm runs dropped events "
                   f"(summary lost_events > 0); the summary always carries lost_events; "
                   f"{{\"event\":\"lost\"}} lines: seen mid-storm in {mid}/{len(lossy)}, "
                   f"present by the end in {at_end}/{len(lossy)}, "
                   f"their counts sum to lost_events in {matches}/{len(lossy)}")
        res["storm"]["loss_reporting"] = {"lossy_runs": len(lossy), "lost_lines_midrun": mid,
                                          "lost_lines_at_end": at_end, "sum_matches": matches}
        rates = [x["broken_pipe_lines"] / r["seconds"] for x in res["storm"]["rows"]
                 for r in data["runs"] if r.get("ok") and r["workload"] == "storm"
                 and r["round"] == x["round"] and r["variant"] == x["variant"] and r["seconds"]]
        if rates:
            out.append(f"event lines the tool printed per second of storm: median "
                       f"{statistics.median(rates):.0f}/s (the rest is dropped at the ring buffer)")
        sg = data.get("storm_sigint")
        if sg and sg.get("ok"):
            ex = sg.get("exit_after_sigint_s")
            out.append(f"SIGINT during a storm: sent {sg['sigint_at_s']:.2f} s into a "
                       f"{sg['storm_ended_at_s']:.2f} s storm; the tool exited "
                       + (f"{ex:.2f} s later" if ex is not None else "NOT AT ALL within the timeout")
                       + (" (before the storm ended: honoured)" if sg.get("exited_before_storm_end")
                          else " (only after the storm ended: NOT honoured while events flood in)"))
        out.append("")

    hs = data.get("hook_stats")
    if hs:
        rows = []
        for wl, h in hs.items():
            if not h.get("programs"):
                continue
            ops = h["ops"] or 1
            for p in h["programs"]:
                if not p["run_cnt"]:
                    continue
                rows.append([wl, p["name"], p["run_cnt"], f"{p['run_cnt'] / ops:.2f}",
                             f"{p['avg_ns']:.0f}" if p["avg_ns"] else "-",
                             f"{p['run_time_ns'] / ops:.0f}"])
            rows.append([wl, "= all programs", sum(p["run_cnt"] for p in h["programs"]), "",
                         "", f"{sum(p['run_time_ns'] for p in h['programs']) / ops:.0f}"])
        out.append("Per-program BPF cost (kernel.bpf_stats_enabled=1, one all-hooks run per workload; "
                   "run_cnt counts every process on the host)")
        out.append(tabulate(rows, headers=["workload", "program", "run_cnt", "runs/op",
                                           "avg ns/run", "ns per workload op"], tablefmt="github"))
        base = {wl: h.get("untraced_ns_per_op") for wl, h in hs.items()}
        if any(base.values()):
            out.append("untraced cost of one op (from the median untraced rate): "
                       + ", ".join(f"{wl} {v:.0f} ns" for wl, v in base.items() if v))
        out.append("")

    sp = data.get("startup_profile")
    if sp and sp.get("phases"):
        rows = []
        for ph in sp["phases"]:
            parts = ph.get("parts")
            name = ph["phase"]
            if parts:
                name += " [" + ", ".join(f"{k} {v:.2f}" for k, v in
                                         sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.005) + "]"
            rows.append([name, f"{ph['seconds']:.3f}", f"{ph['vm_rss_mib']:.0f}",
                         f"{ph['vm_hwm_mib']:.0f}"])
        out.append("Start-up profile: one replay of the tool's start-up with its own functions "
                   "(warm cache; interpreter start not included)")
        out.append(tabulate(rows, headers=["phase", "seconds", "RSS after (MiB)",
                                           "HWM after (MiB)"], tablefmt="github"))
        if sp.get("error"):
            out.append(f"(profile stopped early: {sp['error']})")
        out.append("")
    elif sp and sp.get("error"):
        out.append(f"Start-up profile failed: {sp['error']}\n")

    ab = res.get("ablation")
    if ab:
        rows = []
        for wl, entries in ab.items():
            for e in entries:
                rows.append([wl, e["label"], fmt_spread(e["ratio"]),
                             "" if e["delta"] is None else f"{e['delta']:+.3f}",
                             fmt_spread(e["ratio_cpu"]),
                             "" if e["delta_cpu"] is None else f"{e['delta_cpu']:+.3f}",
                             fmt_spread(e["added_ns_cpu"], lambda x: f"{x:.0f}")])
        out.append("Ablation: ratio to untraced (paired per round) of the tool with hooks left out; "
                   "delta = gain over all hooks, i.e. what that hook costs")
        out.append(tabulate(rows, headers=["workload", "tracer", "wall ratio", "delta",
                                           "per-CPU-s ratio", "delta (CPU)",
                                           "CPU ns added per op"], tablefmt="github"))
        out.append("")

    rows = [[x["goal"], x["target"], x["shown"], x["status"]] for x in res["goals"]]
    out.append("Goals")
    out.append(tabulate(rows, headers=["goal", "target", "measured", "result"], tablefmt="github"))
    return "\n".join(out)
