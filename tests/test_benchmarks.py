"""The benchmark scripts still run and report what they promise (tiny settings; no speed asserted).

Speeds are the scripts' business (printed as ratios measured side by side); these tests only keep
the scripts from rotting and check the correctness figures they print.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_nas_children_benchmark_engines_agree(shared_data, tmp_path, capsys):
    out = _script("nas_children").main(["--data-root", str(shared_data), "--children", "2", "--epochs", "1",
                                        "--max-train", "256", "--skip-batch", "--json", str(tmp_path / "n.json")])
    text = capsys.readouterr().out
    assert "speed ratio fast 1/call / plain" in text and "children/min" in text
    assert [s["engine"] for s in out["summaries"]] == ["plain", "fast 1/call"]
    assert all(s["children_per_min"] > 0 and math.isfinite(s["protocol_min_space_fit"]) for s in out["summaries"])
    assert out["max_val_acc_diff"] <= 2 / 6491          # the engines train the same children alike
    assert out["matmul_gflops"]["fp32"] > 0 and (tmp_path / "n.json").is_file()


@pytest.mark.slow
def test_data_pipeline_benchmark_reports_both_pipelines(shared_data, capsys):
    out = _script("data_pipeline").main(["--data-root", str(shared_data), "--steps", "3", "--warmup", "1",
                                         "--rounds", "1", "--device", "cpu"])
    assert [r["pipeline"] for r in out["runs"]][-1] == "helpers"
    assert set(out["ratio_helpers_over_medmnist"]) and all(v > 0 for v in out["ratio_helpers_over_medmnist"].values())
    assert "ratio helpers /" in capsys.readouterr().out


def test_cpu_amp_benchmark_reports_both_precisions(capsys):
    out = _script("cpu_amp").main(["--models", "cnn", "--steps", "2", "--rounds", "1", "--no-fit"])
    (row,) = out["speed"]
    assert row["fp32_img_s"] > 0 and row["bf16_img_s"] > 0
    assert row["ratio"] == pytest.approx(row["bf16_img_s"] / row["fp32_img_s"])
    assert "bf16/fp32" in capsys.readouterr().out and out["fit"] == []


@pytest.mark.slow
def test_cpu_amp_benchmark_trains_alike_in_both_precisions(shared_data):
    out = _script("cpu_amp").main(["--models", "cnn", "--steps", "1", "--rounds", "1", "--data-root",
                                   str(shared_data), "--max-train", "400", "--epochs", "2"])
    fp32, bf16 = out["fit"]
    assert (fp32["mode"], bf16["mode"]) == ("fp32", "bf16")
    assert abs(fp32["val/auc"] - bf16["val/auc"]) < 0.05   # bf16 changes the numbers a little, not the model
