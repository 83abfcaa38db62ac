"""End-to-end runs of the benchmark scripts on real data with small models; those meant for
accelerator hosts run as there, without TensorFlow or clu."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import figaro
from hairseg_jax import checkpoints, evaluate, files, models
from hairseg_jax.models import layers
from tests.conftest import REPO, SHARED_TRAIN_STEP, config_flags, random_variables, run_python

# Run as on a host without TensorFlow or clu: importing them fails.
BARE = (
    "import sys, runpy\n"
    "for name in ('tensorflow', 'tensorflow_datasets', 'clu'):\n"
    "    sys.modules[name] = None\n"
)


def run_script(
    script: str, args: list[str], env: dict | None = None
) -> subprocess.CompletedProcess:
    """Runs ``python script *args`` (its folder first on ``sys.path``) on a bare install."""
    folder = str(Path(script).parent)
    code = (
        f"{BARE}sys.argv = {[script, *args]!r}\nsys.path.insert(0, {folder!r})\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    return run_python("-c", code, env=env)


def load_train_step():
    """benchmarks/train_step.py as a module."""
    spec = importlib.util.spec_from_file_location("tsb", REPO / "benchmarks/train_step.py")
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    return train_step


class _ConvBatchNorm(flax.linen.Module):
    """Conv, the model's BatchNorm, conv, BatchNorm."""

    @flax.linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.batch_norm(False, name="bn1")(flax.linen.Conv(4, (3, 3))(x))
        return layers.batch_norm(False, name="bn2")(flax.linen.Conv(2, (1, 1))(x))


def test_fold_bn_computes_every_batch_norm_as_its_bias_add():
    """``--fold_bn``'s interceptor: with any running statistics, what the model gives with
    statistics that make each BatchNorm a bias add (mean 0, variance 1 - epsilon)."""
    train_step = load_train_step()
    model = _ConvBatchNorm()
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), images)
    drawn = jax.tree.map(
        lambda leaf: jax.random.uniform(jax.random.key(2), leaf.shape, minval=0.5, maxval=2.0),
        variables["batch_stats"],
    )
    identity = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.full_like(leaf, 1 - 1e-5 if path[-1].key == "var" else 0.0),
        variables["batch_stats"],
    )
    apply = lambda stats: model.apply(  # noqa: E731
        {"params": variables["params"], "batch_stats": stats}, images
    )
    with flax.linen.intercept_methods(train_step.bias_only_batch_norm):
        folded = apply(drawn)
    np.testing.assert_allclose(folded, apply(identity), rtol=1e-5, atol=1e-5)
    assert np.abs(folded - apply(drawn)).max() > 1e-2


def test_time_jax_waits_for_the_warmup_predictions_before_timing(monkeypatch):
    """A predict step returns the state it was given, so waiting for the state alone let the
    last warm-up step run inside the timed steps (CPU predict figures came out 1.2-1.8x slow)."""
    train_step = load_train_step()
    outputs = []

    def predict(state):
        outputs.append(jnp.full((), len(outputs)))
        return state, outputs[-1]

    waited = []
    monkeypatch.setattr(jax, "block_until_ready", lambda tree: waited.append(tree) or tree)
    case = train_step.JaxCase(predict, {"w": jnp.ones(())}, None, 0.0, 0.0, 0.0)
    train_step.time_jax(case, steps_timed=1, warmup=2)
    assert any(leaf is outputs[1] for leaf in jax.tree.leaves(waited[0]))


def test_train_step_alternates_jax_and_torch_without_tensorflow(torch):
    """On a host of 2 devices JAX runs on one of them, as PyTorch does."""
    args = ["--config=configs/figaro.py", "--backbones=resnet18", "--sizes=64"]
    args += ["--batches=2", "--steps=1", "--warmup=0", "--torch", "--rounds=2"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = run_script("benchmarks/train_step.py", args, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("# devices=1xcpu (of 2) ")
    lines = [line for line in result.stdout.splitlines() if line.startswith("train_step")]
    assert [line.split()[1] for line in lines] == ["impl=jax", "impl=torch"]
    jax_fields = dict(field.split("=", 1) for field in lines[0].split()[1:])
    xla, model = (float(jax_fields[f"{k}_gflops_per_image"]) for k in ("xla", "model"))
    assert 0.7 < xla / model < 1.3  # 0.47 when one device's FLOPs were spread over the batch
    fields = dict(field.split("=", 1) for field in lines[1].split()[1:])
    assert fields["rounds"] == "2"
    assert len(fields["jax_ms"].split(",")) == len(fields["torch_ms"].split(",")) == 2
    jax_s, torch_s = float(fields["jax_median_ms_per_step"]), float(fields["ms_per_step"])
    assert float(fields["jax_over_torch"]) == pytest.approx(torch_s / jax_s, abs=0.01)


def test_predict_step_over_two_devices_counts_one_devices_xla_flops():
    """XLA's FLOPs are those of one device's program, which runs half the batch; a config
    variant and a --set override are read as main.py reads them."""
    args = ["--config=configs/figaro.py:smoke", "--set", "model.dropout=0.0", "--predict"]
    args += ["--backbones=resnet18", "--sizes=96", "--batches=2", "--steps=1", "--warmup=0"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = run_script("benchmarks/train_step.py", args, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("# devices=2xcpu (of 2) ")
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("predict_step")]
    fields = dict(field.split("=", 1) for field in line.split()[1:])
    xla, model = (float(fields[f"{k}_gflops_per_image"]) for k in ("xla", "model"))
    # 0.69 here (the CPU computes some convolutions in other forms); 0.35 when one device's
    # FLOPs were spread over the whole batch
    assert 0.5 < xla / model < 1.5


def test_base_config_takes_a_variant_and_only_overrides_of_its_own_fields():
    train_step = load_train_step()
    config = train_step.base_config("configs/figaro.py:scratch", ["optim.learning_rate=0.5"])
    assert config.optim.name == "adamw" and config.optim.learning_rate == 0.5
    assert config.train.ema_decay > 0  # the recipe's step, EMA included
    refused = {
        "loss.dice_wieght=0.5": "--set loss.dice_wieght: configs/figaro.py has no such field.",
        "model.dropout.rate=0": "--set model.dropout.rate: configs/figaro.py has no such field.",
        "model.dtype=bfloat16": "--set model.dtype: this script's own flags set it in each case.",
        "model.dropout": "--set model.dropout: expected KEY=VALUE.",
    }
    for item, message in refused.items():
        with pytest.raises(SystemExit) as exit_info:
            train_step.base_config("configs/figaro.py", [item])
        assert str(exit_info.value) == message
    with pytest.raises(SystemExit, match="^--set model.dropout=abc: .*cannot be cast"):
        train_step.base_config("configs/figaro.py", ["model.dropout=abc"])
    with pytest.raises(SystemExit, match="^--config configs/figaro.py:nope: Unknown variant"):
        train_step.base_config("configs/figaro.py:nope", [])
    with pytest.raises(SystemExit, match="^--config: no config file configs/none.py"):
        train_step.base_config("configs/none.py", [])
    with pytest.raises(SystemExit, match="^--config: README.md is not a Python config file"):
        train_step.base_config("README.md", [])  # was an AttributeError traceback
    with pytest.raises(
        SystemExit,
        match=r"^--config configs/figaro.py: Bad config: optim.learning_rate=-1.0 must be positive",
    ):
        train_step.base_config("configs/figaro.py", ["optim.learning_rate=-1"])


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--sizes=6x4"], "argument --sizes: expected a positive integer, got '6x4'"),
        (["--steps=0"], "argument --steps: expected a positive integer, got '0'"),
        (["--dtypes=float16"], "argument --dtypes: expected one of float32, bfloat16"),
        (["--fold_bn"], "--fold_bn times inference: pass --predict too"),
        (["--rounds=2"], "--rounds alternates JAX and PyTorch: pass --torch too"),
        (["--batches=1"], "--batches: a train step needs at least 2 images"),
        (["--torch", "--backbones=mobilenet_v2"], "the PyTorch reference has no backbone"),
        # Both were tracebacks once the cases before them had run.
        (["--backbones=resnet18,resnet99"], "argument --backbones: expected one of resnet18,"),
        (["--output_stride=7"], "argument --output_stride: invalid choice: 7"),
    ],
)
def test_train_step_flags_are_checked_before_any_work(monkeypatch, capsys, args, error):
    train_step = load_train_step()
    monkeypatch.setattr("sys.argv", ["train_step.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        train_step.parse_args()
    assert exit_info.value.code == 2 and error in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["train_step.py", "--predict", "--batches=1", "--fold_bn"])
    assert train_step.parse_args().batches == [1]  # inference takes single images


def test_a_ctrl_c_ends_a_benchmark_with_one_line_and_status_130():
    """It was a KeyboardInterrupt traceback and, during a compile, a segmentation fault."""
    process = subprocess.Popen(
        [sys.executable, "benchmarks/train_step.py", "--backbones=resnet18", "--sizes=96"],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().startswith("# devices=")  # then it compiles and steps
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "FATAL Interrupted while benchmarking."


def test_the_nvl_cards_have_their_own_peaks():
    """NVL and 40 GB names hold their family's name: each variant must match first."""
    train_step = load_train_step()
    peaks = {
        "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),
        "NVIDIA H100 NVL": (835e12, 3.9e12),
        "NVIDIA H100 PCIe": (756e12, 2.0e12),
        "NVIDIA H200": (989e12, 4.8e12),
        "NVIDIA H200 NVL": (835e12, 4.8e12),
        "NVIDIA A100-SXM4-40GB": (312e12, 1.555e12),
        "NVIDIA A100-SXM4-80GB": (312e12, 2.0e12),
    }
    for kind, figures in peaks.items():
        assert tuple(train_step.accelerator(kind)) == figures, kind
    assert train_step.accelerator("cpu") is None


def test_train_step_times_the_recipes_step_with_its_ema(monkeypatch):
    train_step = load_train_step()
    asked = []

    def create_train_state(rng, model, image_size, tx, ema=False, mesh=None):
        asked.append(ema)
        raise StopIteration  # nothing more is needed

    monkeypatch.setattr(train_step.steps, "create_train_state", create_train_state)
    config = train_step.base_config(str(REPO / "configs/figaro_cpu.py"), [])
    assert config.train.ema_decay > 0
    with pytest.raises(StopIteration):
        train_step.compile_jax(config, predict=False)
    assert asked == [True]


def test_train_step_compares_with_torch_only_the_step_the_reference_computes(torch):
    """The reference is the original's step (SGD, BCE, dropout 0.5, no EMA): JAX's AdamW, Dice
    term and EMA of figaro_cpu.py against it would be another comparison."""
    args = ["--config=configs/figaro_cpu.py", "--backbones=resnet18", "--sizes=64", "--torch"]
    result = run_script("benchmarks/train_step.py", args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "--torch times the original's step, which configs/figaro_cpu.py does not compute: "
        "optim.name='adamw' (the reference's: 'sgd'), loss.dice_weight=0.5 (the reference's: "
        "0.0), model.dropout=0.1 (the reference's: 0.5), train.ema_decay=0.998 (the "
        "reference's: 0.0). Use configs/figaro.py, or --set those fields."
    )
    train_step = load_train_step()
    config = train_step.base_config(str(REPO / "configs/figaro_cpu.py"), [])
    assert train_step.torch_differences(config, predict=True) == []  # the same model


def test_conv_rates_times_every_convolution_in_both_libraries(torch):
    args = ["--backbone=resnet18", "--size=64", "--batch=1", "--repeats=1", "--torch"]
    result = run_script("benchmarks/conv_rates.py", args)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    fields = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in lines]
    header, convs, total = fields[0], fields[1:-1], fields[-1]
    assert header["dtype"] == "float32"
    assert len(convs) == int(header["shapes"])
    assert sum(int(conv["count"]) for conv in convs) == int(header["convs"])
    assert {conv["kernel"] for conv in convs} == {"1", "3", "7"}
    for impl in ("jax", "plain", "torch"):
        for key in (f"{impl}_fwd_ms", f"{impl}_fwd_bwd_ms"):
            assert all(float(conv[key]) > 0 for conv in convs), key
            assert float(total[key]) == pytest.approx(
                sum(int(conv["count"]) * float(conv[key]) for conv in convs), abs=1.0
            )

    # The FLOPs are the model's as train_step.py counts them, less the image resizes (both
    # leave out the taps of dilated convolutions that only ever read padding).
    train_step = load_train_step()
    base = train_step.base_config(str(REPO / "configs/figaro.py"), [])
    config = train_step.case_config(base, "resnet18", 64, 1, "float32", 16)
    model_gflops = train_step.image_forward_flops(models.build_model(config.model), 64) / 1e9
    assert float(total["forward_gflops"]) == pytest.approx(model_gflops, rel=0.01)


def fields(line: str) -> dict[str, str]:
    """``key=value`` pairs of a benchmark's output line."""
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def test_eval_benchmark_scores_the_split_as_eval_does_without_tensorflow(figaro_dir, tmp_path):
    """Random weights in a best checkpoint, flip TTA and a tuned threshold: the benchmark's
    Dice is the one eval reports."""
    config = figaro.get_config("smoke")
    config.data.data_dir, config.eval.image_size, config.eval.tta = str(figaro_dir), 64, "flip"
    best = checkpoints.best_manager(tmp_path)
    variables = random_variables(models.build_model(config.model), 64)
    checkpoints.save(best, 3, variables, metrics={checkpoints.BEST_METRIC: 0.5})
    best.wait_until_finished()
    settings = evaluate.predictor_settings(config, "eval")
    files.write_json(tmp_path / evaluate.THRESHOLD_FILE, {"threshold": 0.3, "step": 3, **settings})
    result = run_script(
        "benchmarks/eval.py",
        [
            "--config=configs/figaro.py:smoke",
            f"--config.data.data_dir={figaro_dir}",
            f"--workdir={tmp_path}",
            "--config.eval.image_size=64",
            "--config.eval.tta=flip",
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("eval ")]
    assert len(lines) == 1, result.stdout
    line = fields(lines[0])
    assert (line["split"], line["images"], line["weights"]) == ("test", "8", "step_3")
    assert float(line["predict_score_s"]) > 0
    report = evaluate.evaluate(config, tmp_path)
    assert report["threshold"] == 0.3 and abs(report["dice"] - report["dice_at_0.5"]) > 1e-3
    assert float(line["dice"]) == pytest.approx(report["dice"], abs=5e-5)


@pytest.mark.parametrize(
    "script, flag, fatal",
    [
        # eval.py scored a mistyped workdir as random weights, with status 0.
        ("eval", "--workdir={tmp}/typo", "FATAL --workdir={tmp}/typo is not a folder."),
        (
            "eval",
            "--workdir={tmp}",
            "FATAL No best checkpoint in {tmp}/best and no config.model.pretrained; train "
            "there first.",
        ),
        # A traceback (range() arg 3 must not be zero) after reading the split.
        (
            "eval",
            "--config.eval.batch_size=0",
            "FATAL Bad config: eval.batch_size=0 must be positive.",
        ),
        # A 36-line traceback.
        (
            "eval",
            "--config=configs/nope.py",
            "FATAL Cannot load the --config file: [Errno 2] No such file or directory: "
            "'configs/nope.py'",
        ),
        # time_to_dice.py wrote --out after the run: a traceback then, the summary lost.
        ("time_to_dice", "--out={tmp}", "FATAL --out={tmp} is a folder."),
        # Trained with loss nan at -25 img/s, and reported with status 0.
        (
            "time_to_dice",
            "--config.train.batch_size=-2",
            "FATAL Bad config: train.batch_size=-2 must be at least 2 (BatchNorm over the batch).",
        ),
    ],
)
def test_eval_and_time_to_dice_stop_with_main_pys_line_before_any_work(
    tmp_path, script, flag, fatal
):
    result = run_script(
        f"benchmarks/{script}.py", ["--config=configs/figaro.py:smoke", flag.format(tmp=tmp_path)]
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == fatal.format(tmp=tmp_path)


@pytest.mark.parametrize(
    "flag, status, error",
    [
        # Wrote 1x1 pixel images, with status 0.
        ("--max_side=0", 2, "error: --max_side=0 must be positive"),
        ("--out={tmp}", 2, "error: --out={tmp} exists; name a folder to create"),
        # A traceback after the 735 training images had been written.
        ("--full_splits=bogus", 1, "FATAL Unknown split 'bogus'; expected one of"),
    ],
)
def test_shrink_figaro_stops_with_one_line_and_leaves_no_partial_copy(
    figaro_dir, tmp_path, flag, status, error
):
    out = tmp_path / "copy"
    result = run_script(
        "benchmarks/shrink_figaro.py",
        [f"--data_dir={figaro_dir}", f"--out={out}", flag.format(tmp=tmp_path)],
    )
    assert result.returncode == status and "Traceback" not in result.stderr, result.stderr
    assert error.format(tmp=tmp_path) in result.stderr.strip().splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize(
    "flag, fatal",
    [
        # A ValueError traceback, after the split had been read.
        ("--sizes=64,,96", "FATAL Flags parsing error: flag --sizes=['64', '', '96']: --sizes "),
        # A TensorFlow traceback.
        ("--config.train.batch_size=0", "FATAL Bad config: train.batch_size=0 must be at least 2"),
        # Printed images_per_s=0.0, with status 0.
        ("--num_batches=0", "FATAL Flags parsing error: flag --num_batches=0: 0 is not a positive"),
    ],
)
def test_input_pipeline_benchmark_stops_with_one_line(flag, fatal):
    result = run_python("benchmarks/input_pipeline.py", "--config=configs/figaro.py:smoke", flag)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert any(line.startswith(fatal) for line in result.stderr.splitlines()), result.stderr


def test_input_pipeline_benchmark_times_augmented_batches(figaro_dir):
    result = run_python(
        "benchmarks/input_pipeline.py",
        "--config=configs/figaro.py:smoke",
        f"--config.data.data_dir={figaro_dir}",
        "--sizes=48,64",
        "--warmup=1",
        "--num_batches=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [fields(line) for line in result.stdout.splitlines() if line.startswith("input_")]
    assert lines[0]["images"] == "16"  # the smoke run's training images, read once
    assert [line["image_size"] for line in lines[1:]] == ["48", "64"]
    assert all(float(line["images_per_s"]) > 0 for line in lines[1:])


def test_dilated_conv_formulations_agree_without_tensorflow():
    result = run_script(
        "benchmarks/dilated_conv.py", ["--repeats=1", "--case", "1,9,4,4,2", "--case", "2,9,4,3,6"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [fields(line) for line in result.stdout.splitlines() if line.startswith("dilated_")]
    assert [(line["rate"], line["impl"]) for line in lines] == [
        (rate, impl) for rate in "26" for impl in ("dilated", "space_to_batch", "tap_products")
    ]
    assert all(float(line["max_abs_diff"]) < 1e-5 for line in lines)
    assert {line["real_fraction"] for line in lines} == {"0.73", "0.31"}
    # Were tracebacks: UnboundLocalError, and a zero-size array.
    for flag, error in (
        ("--repeats=0", "argument --repeats: expected a positive integer, got '0'"),
        ("--case=0,8,32,32,2", "argument --case: expected BATCH,SIDE,CIN,COUT,RATE (positive"),
    ):
        result = run_script("benchmarks/dilated_conv.py", [flag])
        assert result.returncode == 2 and error in result.stderr, result.stderr[-2000:]


def test_profile_step_sums_the_step_by_kind_without_tensorflow():
    result = run_script(
        "benchmarks/profile_step.py",
        ["--backbone=resnet18", "--size=32", "--batch=2", "--steps=1", "--top=3"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("op ") for line in lines) == 3
    kinds = {
        line.split()[1]: float(line.split()[-1].rstrip("%"))
        for line in lines
        if line.startswith("kind ")
    }
    assert kinds["conv"] > 0 and kinds["conv_grad"] > 0 and kinds["elementwise"] > 0
    assert abs(sum(kinds.values()) - 100) < 0.5


def test_roofline_counts_every_batch_norm_and_bounds_the_mfu(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("roofline", REPO / "benchmarks/roofline.py")
    roofline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roofline)
    train_step = load_train_step()
    base = train_step.base_config(str(REPO / "configs/figaro.py"), [])
    config = train_step.case_config(base, "resnet18", 64, 2, "bfloat16", 16)
    norms, values = roofline.batch_norm_values(config)

    # The same maps counted another way: the inputs of every normalize_batch in the jaxpr.
    model = models.build_model(config.model)
    images = jnp.zeros((2, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    jaxpr = jax.make_jaxpr(
        lambda v: model.apply(
            v, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
        )
    )(variables)
    calls = [
        e for e in jaxpr.jaxpr.eqns if "_normalize_batch_backward" in str(e.params.get("bwd", ""))
    ]
    assert norms == len(calls) == len(jax.tree.leaves(variables["batch_stats"])) // 2
    assert values == sum(e.invars[0].aval.size for e in calls)

    args = ["--backbones=resnet18", "--sizes=64", "--batches=2,4", "--devices=H100,H200"]
    args.append("--conv_efficiency=0.5")
    result = run_script("benchmarks/roofline.py", args)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [fields(line) for line in result.stdout.splitlines() if line.startswith("roofline ")]
    cases = [(batch, device) for batch in ("2", "4") for device in ("H100", "H200")]
    assert [(row["batch"], row["device"]) for row in rows] == cases
    assert float(rows[0]["bn_gvalues_per_step"]) == pytest.approx(values / 1e9, rel=1e-3)
    assert float(rows[0]["bn_gbytes_per_step"]) == pytest.approx(8 * 2 * values / 1e9, rel=0.01)
    flops = 3 * train_step.image_forward_flops(model, 64) * 2
    assert float(rows[0]["model_tflop_per_step"]) == pytest.approx(flops / 1e12, rel=1e-3)
    # Each convolution's forward pass and gradients (the stem's input gradient is not taken;
    # left out too, the 0.1% of jax.image.resize's products in the upsampling), and one
    # kernel's HBM traffic: the stem's weight gradient reads the images and the output
    # gradient in bf16 and writes the float32 kernel.
    kernels = roofline.conv_kernels(config)
    stem = 2.0 * (2 * 32 * 32 * 64) * (7 * 7 * 3)
    assert sum(f for f, _ in kernels) == pytest.approx(flops - stem, rel=2e-3)
    assert (stem, 2 * (2 * 64 * 64 * 3 + 2 * 32 * 32 * 64) + 4 * 7 * 7 * 3 * 64) in kernels
    params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    for row in rows:
        compute, memory = float(row["compute_ms"]), float(row["memory_ms"])
        kernels_ms, optimizer = float(row["kernels_ms"]), float(row["optimizer_ms"])
        spec = train_step.accelerator(row["device"])
        assert optimizer == pytest.approx(1e3 * 5 * 4 * params / spec.bandwidth, rel=0.01)
        # Each kernel takes at least its FLOPs at half the peak and its bytes at the bandwidth.
        rate = 0.5 * spec.bf16_peak
        assert kernels_ms >= 0.99 * 1e3 * (flops - stem) * int(row["batch"]) / 2 / rate
        assert kernels_ms >= 0.99 * float(row["conv_memory_ms"])
        ceiling = compute / (kernels_ms + memory + optimizer)
        assert float(row["mfu_ceiling"]) == pytest.approx(ceiling, abs=0.002)
        fused = compute / (kernels_ms + optimizer)
        assert float(row["mfu_ceiling_bn_fused"]) == pytest.approx(fused, abs=0.002)
    # H200: the same peak, more bandwidth, a higher ceiling; twice the batch, twice the bytes.
    assert float(rows[1]["mfu_ceiling"]) > float(rows[0]["mfu_ceiling"])
    assert float(rows[2]["bn_gvalues_per_step"]) == pytest.approx(
        2 * float(rows[0]["bn_gvalues_per_step"]), rel=0.01
    )

    unknown = run_script("benchmarks/roofline.py", ["--devices=TPU"])
    assert unknown.returncode == 2 and "unknown device 'TPU'" in unknown.stderr
    # Were figures with status 0: kernels_ms=inf and mfu_ceiling=0.000; memory_ms < 0.
    for flag, error in (
        ("--conv_efficiency=0", "--conv_efficiency=0 must be in (0, 1]"),
        ("--conv_efficiency=2", "--conv_efficiency=2 must be in (0, 1]"),
        ("--bn_passes=-3", "--bn_passes=-3 must not be negative"),
    ):
        monkeypatch.setattr("sys.argv", ["roofline.py", flag])
        with pytest.raises(SystemExit) as exit_info:
            roofline.parse_args()
        assert exit_info.value.code == 2 and error in capsys.readouterr().err


# Last in the file: by then test_preemption.py (started beside this file) has compiled the
# train step this run shares with it.
def test_shrink_then_time_to_dice_without_tensorflow(figaro_dir, tmp_path):
    split = json.loads((figaro_dir / "train_val_test.json").read_text())
    small_split = tmp_path / "split.json"
    train = [  # the original's .npy names and, as a split file may also give them, PBM names
        {**e, "annotation": e["annotation"].replace(".npy", "-gt.pbm")} if i % 2 else e
        for i, e in enumerate(split["train"][:8])
    ]
    small_split.write_text(json.dumps({"train": train, "test": split["test"][:3]}))
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
            *config_flags(SHARED_TRAIN_STEP),  # test_preemption's train step (a cache hit)
            "--config.augment.device_max_side=100",
            "--log_every=100",  # more than the 8 steps: the budget is checked at every step
            "--budget_s=0.001",
            f"--out={summary_file}",
        ],
    )
    assert trained.returncode == 0, trained.stderr
    assert "8 train images packed to 100 px, 8 steps" in trained.stdout
    summary = json.loads(summary_file.read_text())
    done = summary["steps"]
    assert summary["stopped_early_at"] == done < 8 and summary["total_steps"] == 8
    assert f"step {done}/8 loss" in trained.stdout
    assert summary["num_images"] == 3 and summary["split"] == "test"
    assert 0.0 <= summary["dice"] <= 1.0 and summary["nonfinite_steps"] == 0
    assert sum(v["num_images"] for v in summary["per_hair_type"].values()) == 3
    assert f"test_dice={summary['dice']:.4f}" in trained.stdout
