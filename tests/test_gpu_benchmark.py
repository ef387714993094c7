"""benchmarks/gpu.py --dry: the GPU benchmark's code path on the CPU, tiny sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_gpu_benchmark_dry_run_writes_report_and_results(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    gpu.main(["--dry", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["model"], r["setting"]): r for r in results["rows"]}
    for model in ("mlp", "resnet18"):
        for setting in ("exact", "checkpointing", *(f"`{s}`" for s in gpu.SETTINGS)):
            row = rows[(model, setting)]
            assert row["step_s"] > 0 and row["peak_bytes"] is None  # no allocator peak on CPU
    has_gpt2 = importlib.util.find_spec("transformers") is not None
    assert (("gpt2", "`rad:keep=0.2,bits=2` + checkpointing") in rows) == has_gpt2
    report = (tmp_path / "report.md").read_text()
    assert "## resnet18" in report and "dry run" in report
