"""DistributedDataParallel through helpers.train.fit: 2 CPU processes over gloo via torchrun."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_identical(tmp_path):
    pytest.importorskip("torch.distributed.run")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RLMED_PROGRESS": "none", "RLMED_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    r0, r1 = reports
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world"] == r1["world"] == 2
    assert r0["main"] and not r1["main"]
    # the ranks trained on disjoint halves of the data
    assert len(r0["ids"]) == len(r1["ids"]) == 80
    assert not set(r0["ids"]) & set(r1["ids"])
    # identical final model on both ranks (parameters and BatchNorm buffers)
    assert r0["params"] == r1["params"]
    assert r0["buffers"] == r1["buffers"]
    assert r0["best_epoch"] == r1["best_epoch"]
    assert r0["val_acc"] == r1["val_acc"]
    for r in reports:
        assert r["loss"][-1] < r["loss"][0]
    # a whole unit: both ranks return the one stored unit's metrics, rank 0 alone evaluated and stored it
    assert r0["unit"]["metrics"] == r1["unit"]["metrics"]
    assert {"val/acc", "test/acc", "test/auc", "params"} <= set(r0["unit"]["metrics"])
    assert r0["unit"]["units"] == r1["unit"]["units"] == 1
    assert len(list((tmp_path / "results" / "units").glob("*.json"))) == 1
