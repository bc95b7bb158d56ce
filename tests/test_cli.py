"""The ``tdml`` command as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tdml(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_plan_prints_stages_and_trainers(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "stages: 2\ntrainers:\n  - {name: gpu-a, memory_bytes: 1000000}\n  - {name: gpu-b, memory_bytes: 8000000}\n"
    )
    r = tdml("plan", str(spec))
    assert r.returncode == 0, r.stderr
    assert "gpu-a" in r.stdout and "gpu-b" in r.stdout and "MiB" in r.stdout


@pytest.mark.parametrize(
    "text, message",
    [
        ("top_k: 3\ndata_parallel: 2\n", "top_k (3) must not exceed data_parallel (2)"),
        ("learning_rate: 0.1\n", "learning_rate: unknown field"),
        ("data_parallel: 1\ntop_k: 1\n", "data_parallel: must be at least 2"),
        ("stages: 2\ntrainers: [{name: t, memory_bytes: 10}, {name: u, memory_bytes: 10}]\n", "too small"),
        ("model: nowhere.module:make\n", "cannot import 'nowhere.module'"),
    ],
)
def test_user_mistakes_give_one_clear_error(tmp_path, text, message):
    spec = tmp_path / "job.yaml"
    spec.write_text(text)
    r = tdml("plan", str(spec))
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_train_and_baselines_write_summaries(tmp_path):
    spec = tmp_path / "small.yaml"
    spec.write_text(
        "data_parallel: 2\nstages: 2\nepochs: 2\nbatch_size: 32\nmicrobatches: 4\ntop_k: 1\nschedule: 1f1b\n"
    )
    r = tdml("train", str(spec), "--out", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    assert "epoch 2: global test accuracy" in r.stdout
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert s["job"]["data_parallel"] == 2 and s["mode"] == "tdml"
    assert [e["epoch"] for e in s["epochs"]] == [0, 1]
    for e in s["epochs"]:
        assert sum(lc["selected"] for lc in e["local"]) == 1
        best = max(e["local"], key=lambda lc: lc["accuracy"])
        assert best["selected"]
    assert s["final_accuracy"] == s["epochs"][-1]["global_accuracy"] > 0.6  # 2 epochs; chance is 0.1
    assert "test set" in s["accuracy_sets"]["final_accuracy, global_accuracy, global_loss"]
    assert (tmp_path / "t" / "accuracy.png").stat().st_size > 1000

    for kind in ("single", "fedavg"):
        r = tdml("baseline", kind, str(spec), "--out", str(tmp_path / kind))
        assert r.returncode == 0, r.stderr
        b = json.loads((tmp_path / kind / "summary.json").read_text())
        assert b["mode"] == kind and b["final_accuracy"] > 0.6
