"""`repro` fingerprints this kernel; `compare` marks exactly what differs."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from .conftest import ROOT

PY = [sys.executable, "-m", "tracer"]


@pytest.fixture(scope="module")
def fingerprint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "this.json"
    r = subprocess.run([*PY, "repro", "--json", str(path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    return r, path


@pytest.mark.bpf
def test_repro_every_scenario_gets_its_verdict(fingerprint):
    """All scenarios in one trace: sockets of one scenario reuse the memory of
    the last one's, so this also proves histories do not leak across sockets."""
    r, path = fingerprint
    doc = json.loads(path.read_text())
    bad = {n: (f["causes"], f["sigpipe"]) for n, f in doc["scenarios"].items()
           if not f["as_expected"]}
    assert not bad and r.returncode == 0, (bad, r.stderr)
    assert doc["kernel"]["release"] and doc["plan"]["send_failure"].startswith("raw_tracepoint")
    slow = doc["scenarios"]["slow_accept"]
    assert slow["sends"] == [5, "EPIPE", "EPIPE"] and slow["rst_state"] == "CLOSE_WAIT"
    assert slow["states"][0] != "ESTABLISHED>FIN_WAIT1"     # only this socket's life
    assert doc["scenarios"]["sigpipe_default"]["exit_signal"] == 13


@pytest.mark.bpf
def test_compare_marks_exactly_the_edited_fact(fingerprint, tmp_path):
    _, path = fingerprint
    doc = json.loads(path.read_text())
    same = subprocess.run([*PY, "compare", str(path), str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert same.returncode == 0 and "all scenario facts equal" in same.stdout
    other = copy.deepcopy(doc)
    other["kernel"]["release"] = "other-kernel"
    other["scenarios"]["own_shutdown"]["errors"] = ["ECONNRESET"]
    p2 = tmp_path / "other.json"
    p2.write_text(json.dumps(other))
    diff = subprocess.run([*PY, "compare", "--json", str(path), str(p2)], cwd=ROOT,
                          capture_output=True, text=True)
    assert diff.returncode == 1
    rows = json.loads(diff.stdout)["rows"]
    assert [(r["scenario"], r["fact"]) for r in rows if r["differs"]] == [("own_shutdown", "errors")]
