"""End-to-end runs of the benchmark scripts that carry Figaro1k to, and train on, an
accelerator host without TensorFlow (real data, small model)."""

import json
import subprocess
import sys

from tests.conftest import REPO

# Run as on a host without TensorFlow or clu: importing them fails.
BARE = (
    "import sys, runpy\n"
    "for name in ('tensorflow', 'tensorflow_datasets', 'clu'):\n"
    "    sys.modules[name] = None\n"
)


def run_script(script: str, args: list[str]) -> subprocess.CompletedProcess:
    code = (
        f"{BARE}sys.argv = {[script, *args]!r}\nrunpy.run_path({script!r}, run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600
    )


def test_shrink_then_time_to_dice_without_tensorflow(figaro_dir, tmp_path):
    split = json.loads((figaro_dir / "train_val_test.json").read_text())
    small_split = tmp_path / "split.json"
    small_split.write_text(json.dumps({"train": split["train"][:8], "test": split["test"][:3]}))
    copy = tmp_path / "small"
    shrunk = run_script(
        "benchmarks/shrink_figaro.py",
        [
            f"--data_dir={figaro_dir}",
            f"--split_file={small_split}",
            f"--out={copy}",
            "--max_side=100",
        ],
    )
    assert shrunk.returncode == 0, shrunk.stderr
    assert "8 train, 3 test" in shrunk.stdout

    summary_file = tmp_path / "summary.json"
    trained = run_script(
        "benchmarks/time_to_dice.py",
        [
            "--config=configs/figaro.py:smoke",
            f"--config.data.data_dir={copy}",
            "--config.data.image_size=64",
            "--config.train.num_steps=4",
            "--config.eval.image_size=64",
            "--config.augment.device_max_side=100",
            "--log_every=2",
            f"--out={summary_file}",
        ],
    )
    assert trained.returncode == 0, trained.stderr
    assert "8 train images packed to 100 px, 4 steps" in trained.stdout
    assert "step 4/4 loss" in trained.stdout
    summary = json.loads(summary_file.read_text())
    assert summary["num_images"] == 3 and summary["steps"] == 4 and summary["split"] == "test"
    assert 0.0 <= summary["dice"] <= 1.0 and summary["nonfinite_steps"] == 0
    assert sum(v["num_images"] for v in summary["per_hair_type"].values()) == 3
    assert f"test_dice={summary['dice']:.4f}" in trained.stdout
