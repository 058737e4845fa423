"""Smoke test of benchmarks/obs_cost.py: its --quick mode runs and writes the documented JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("apts_jax.obs")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "obs_cost.py"


def test_obs_cost_quick_writes_schema(tmp_path: Path) -> None:
    out = tmp_path / "obs_cost.json"
    env = {**os.environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--repeats", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratio" in proc.stdout

    report = json.loads(out.read_text())
    assert report["schema_version"] == 1
    assert report["quick"] is True
    for field in ("cpu_model", "cores", "jax", "loadavg_start", "loadavg_end"):
        assert field in report["machine"]
    assert report["settings"]["dtype"] == "float32"
    assert report["settings"]["mlp"]["sizes"] == [784, 512, 256, 10]
    assert report["mlp_grad"]["median_s"] > 0
    assert report["mlp_grad"]["iqr_s"] >= 0

    ns, ms = report["settings"]["ns"], report["settings"]["ms"]
    assert sorted((r["n"], r["m"]) for r in report["results"]) == sorted(
        (n, m) for n in ns for m in ms
    )
    has_memory = report["settings"]["has_solve_memory"]
    for row in report["results"]:
        timings = [("solve", row["solve"])]
        if has_memory:
            timings.append(("solve_memory", row["solve_memory"]))
        else:
            assert row["solve_memory"] is None
        for name, t in timings:
            assert t["median_s"] > 0 and t["iqr_s"] >= 0
            assert t["count"] == 2 * len(report["settings"]["scenarios"])
            ratio = row[f"ratio_{name}"]
            assert ratio == pytest.approx(t["median_s"] / report["mlp_grad"]["median_s"])
        assert row["two_pass_floor"]["median_s"] > 0
        assert row["ratio_two_pass_floor"] > 0
        for name, entry in row["scenarios"].items():
            # The OBS step is feasible; on the well-conditioned positive definite scenarios
            # solve and solve_memory agree (indef_r10 is close to the hard case, where the step
            # is sensitive to rounding, so it is not compared here).
            assert entry["step_norm"] <= entry["radius"] * (1 + 1e-3)
            if has_memory and name.startswith("pd"):
                assert entry["rel_diff_solve_vs_memory"] < 1e-3
    # The scenarios are built so that both interior and boundary solutions occur.
    assert {"INTERIOR", "BOUNDARY"} <= set(report["cases_seen"])
