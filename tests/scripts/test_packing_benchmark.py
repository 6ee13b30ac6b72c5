"""benchmarks/packing.py at tiny size: the real fractions, padded and packed, and the step-time ratio against the
padded baseline commit, on a few micro-batches of the shipped GPU configs' shapes."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import packing  # noqa: E402  (benchmarks/packing.py)

BASELINE = "2f0e87a"  # the last padded commit


def test_packing_benchmark_at_tiny_size(tiny_models, capsys):
    results = packing.main(["--models", str(tiny_models), "--batches", "3", "--baseline", ""])
    assert set(results) == {"pretraining", "qa"}
    for r in results.values():
        assert r["encoder_packed"] == r["decoder_packed"] == 1.0  # nothing computed is padding
        assert 0 < r["encoder_padded"] < 1 and 0 < r["decoder_padded"] < 1  # the same batches, right-padded
    assert results["qa"]["encoder_padded"] < results["pretraining"]["encoder_padded"]  # joint contexts vary most
    assert "pretraining" in capsys.readouterr().out
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{BASELINE}^{{commit}}"], capture_output=True)
    if known.returncode != 0:
        return  # a shallow clone may not hold the baseline commit: no timing
    timed = packing.main(
        [
            "--models",
            str(tiny_models),
            "--tasks",
            "pretraining",
            "--batches",
            "2",
            "--steps",
            "3",
            "--repeats",
            "1",
            "--baseline",
            BASELINE,
        ]
    )
    r = timed["pretraining"]
    assert (
        r["step_before_s"] > 0 and r["step_after_s"] > 0 and r["step_ratio"] == r["step_after_s"] / r["step_before_s"]
    )
