"""Helpers for scripts/bench (the epipe-trace overhead benchmark).

procs.py            start/stop the tracer and the C workloads, with timeouts
hookstats.py        per-BPF-program run_time_ns/run_cnt (kernel.bpf_stats_enabled)
report.py           statistics, tables and goals
startup_profile.py  time and RSS per start-up phase (replays the tool's start-up)
ablate_runner.py    the tool with some hooks left out (for --ablate)
wl.c                the workloads (compiled with gcc at run time into a temp dir)
"""
