"""The demo's report (arctrain/inference/report.py) on a small real run: val table, PNG, reconstruction lines."""

import re
import subprocess
import sys

import pytest
from helpers import launch, overrides, wait

from arctrain.cli import main as arctrain
from arctrain.inference.report import plot_val_curves, read_metrics, val_curves, val_table

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def run_with_val(tiny_models, tiny_shards, tmp_path_factory):
    """4 steps on 1 process with a val pass every 2 steps, exported."""
    run_dir = tmp_path_factory.mktemp("report_run")
    args = overrides(tiny_models, tiny_shards, run_dir, "train.steps=4", "eval.interval=2", "eval.batches=1")
    assert wait(launch(args, 1, run_dir / "train.log")) == [0], (run_dir / "train.log.rank0").read_text()[-2000:]
    arctrain(["export", "--run", str(run_dir), "--out", str(run_dir / "export")])
    return run_dir


def test_val_table_and_curves_are_the_metrics(run_with_val, tmp_path):
    lines = read_metrics(run_with_val)
    val_rows = [r for r in lines if any(k.startswith("val/") for k in r)]
    assert [r["step"] for r in val_rows] == [2, 4]
    table = val_table(lines).splitlines()
    assert table[0] == "val loss at step 4: with compressed context vs no context"
    names = [f"{d}/{t}" for d in ("llama", "mistral") for t in ("continuation", "reconstruction")]
    assert sorted(val_curves(lines)) == names and len(table) == 2 + len(names)
    last = val_rows[-1]
    for name, row in zip(names, table[2:], strict=True):
        with_ctx, without = last[f"val/{name}/loss"], last[f"val/{name}/loss_no_context"]
        assert row.split() == [name, f"{with_ctx:.3f}", f"{without:.3f}", f"{with_ctx / without:.2f}x"]
    png = plot_val_curves(lines, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height  # 2 decoders x 2 tasks, tasks across


def test_report_command_prints_table_reconstruction_and_png_path(run_with_val, tiny_models, tmp_path):
    png = tmp_path / "val.png"
    cmd = [
        sys.executable,
        "-m",
        "arctrain.inference.report",
        "--run",
        str(run_with_val),
        "--png",
        str(png),
        "--export",
        str(run_with_val / "export"),
        "--decoder",
        f"llama={tiny_models / 'llama'}",
        "--input",
        str(tiny_models / "corpus.jsonl"),
        "--val-fraction",
        "0.05",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("val loss at step 4")
    recon = next(i for i, line in enumerate(out) if line.startswith("llama reconstruction of "))
    assert re.fullmatch(r"llama reconstruction of 64 held-out segments: token accuracy 0\.\d{3}, .*", out[recon])
    assert re.fullmatch(r"held-out passage \(\d+ encoder tokens -> \d+ vectors\), original:", out[recon + 1])
    assert out[recon + 3] == "reconstructed greedily by llama from its vectors:"
    assert out[-1] == f"val curves: {png}" and png.is_file()


def test_a_run_without_val_rows_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    cmd = [sys.executable, "-m", "arctrain.inference.report", "--run", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"arctrain report: error: {tmp_path / 'metrics.jsonl'}: no val rows to report (was eval.interval 0?)"
    )
