"""`torchrun --nproc_per_node=2 -m randprop train` end to end: a run, then a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import randprop
from randprop.data import load_dataset
from randprop.train import checkpoint as ckpt_io
from randprop.train.loop import batch_indices, build_seeded

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

ARGS = ["--model", "softmax-reg", "--data", "mnist", "--method", "aop:keep=0.5", "--batch", "32",
        "--log-every", "1", "--checkpoint-every", "1", "--threads", "1"]  # fmt: skip


def torchrun(out: Path, *args: str) -> str:
    """Run 2 processes (--standalone: a free local port); their stdout."""
    src = str(Path(randprop.__file__).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "randprop", "train", *ARGS, "--out", str(out), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_torchrun_train_writes_from_rank0_and_resumes(tmp_path):
    out = tmp_path / "run"
    torchrun(out, "--steps", "2")
    first = ckpt_io.load_checkpoint(out / ckpt_io.CHECKPOINT)
    stdout = torchrun(out, "--steps", "4", "--resume")

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processes"], summary["steps"], summary["batch"]) == (2, 4, 32)
    assert stdout.count('"processes": 2') == 1  # one summary printed, by rank 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # one writer

    # every rank's own state is checkpointed: the seed streams advanced, the AOP memory differs
    ckpt = ckpt_io.load_checkpoint(out / ckpt_io.CHECKPOINT)
    assert first["step"] == 2 and ckpt["step"] == 4
    states = [rank["method_state"]["1"] for rank in ckpt["ranks"]]
    assert [s["step"] for s in states] == [4, 4]
    assert not torch.equal(states[0]["aop_memory_x"], states[1]["aop_memory_x"])

    # the ranks split the global batch: step 1's mean loss is the whole batch's (exact forward)
    splits = load_dataset("mnist")
    x, y = splits.train.tensors
    idx = batch_indices(len(x), 32, 0, 0)
    with torch.no_grad():
        loss = F.cross_entropy(build_seeded("softmax-reg", 0)(x[idx]), y[idx])
    assert records[0]["loss"] == pytest.approx(float(loss), rel=1e-5)
