"""Data parallelism: 8 CPU devices, or 2 processes, train and evaluate like 1 device; clear
batch-size errors.

The multi-device checks run in subprocesses: ``--xla_force_host_platform_device_count`` only
takes effect before JAX initialises.
"""

import errno
import json
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from configs import figaro, synthetic
from hairseg_jax import checkpoints, evaluate, models, sharding, steps
from hairseg_jax.data import device_augment, pipeline
from hairseg_jax.data.synthetic import make_examples
from tests.conftest import REPO, TinyNet, random_variables, run_python

DEVICES = 8
SIZE = 32
BATCH = 8
NUM_STEPS = 3


def cpu_env(devices: int = DEVICES) -> dict[str, str]:
    """The environment of a subprocess with ``devices`` CPU devices."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def tiny_config():
    """A ResNet-18 DeepLabV3+ with 16-channel heads, computing in float64 (see
    test_eight_devices_match_one_device); dropout stays on (0.5)."""
    config = synthetic.get_config()
    config.model.aspp_channels = 16
    config.model.decoder_channels = 16
    config.model.dtype = "float64"
    config.optim.schedule = "constant"
    return config


def train_and_predict_on_meshes(out: str) -> None:
    """Subprocess body: the same steps and evaluation on a 1-device and an 8-device mesh.

    Pickles, per device count, the params, BatchNorm statistics, optimizer state, losses and
    per-image Dice, plus the error for a batch that 8 devices cannot split.
    """
    assert jax.device_count() == DEVICES, jax.devices()
    config = tiny_config()
    tx = steps.create_optimizer(config.optim, steps.learning_rate_schedule(config.optim, 10))
    # rbg keys initialise faster on CPU; dropout takes a threefry key, whose masks do not
    # depend on how the batch is split.
    initial = steps.create_train_state(
        jax.random.key(0, impl="rbg"), models.build_model(config.model), SIZE, tx
    ).replace(rng=jax.random.PRNGKey(0))
    data = make_examples(BATCH * NUM_STEPS, size=SIZE, seed=0)
    images, masks = np.stack(data.images), np.stack(data.masks)
    batches = [
        {"image": images[i : i + BATCH], "mask": masks[i : i + BATCH]}
        for i in range(0, len(images), BATCH)
    ]
    val = make_examples(6, size=40, seed=1)  # batches of 4 (1 device) or 8 (8), both padded
    packed = device_augment.pack(make_examples(5, size=40, seed=2), 36)
    results = {}
    for count in (1, DEVICES):
        mesh = sharding.data_mesh(jax.devices()[:count])
        train, predict = steps.jit_steps(config, mesh)
        state = sharding.replicate(initial, mesh)
        losses = []
        for batch in batches:
            state, metrics = train(state, sharding.shard_batch(batch, mesh))
            losses.append(metrics["loss"])
        rows = evaluate.score_examples(predict, state, val, SIZE, 4, mesh=mesh).rows
        drawn = device_augment.train_batches(
            sharding.replicate(packed, mesh), 8, SIZE, config.augment, 0, mesh, start_step=3
        )
        device_batch = next(drawn)
        results[count] = jax.device_get(
            {
                "device_batch": device_batch,
                "device_batch_sharding": str(device_batch["image"].sharding),
                "params": state.params,
                "batch_stats": state.batch_stats,
                "opt_state": state.opt_state,
                "loss": np.array(losses),
                "dice": np.array([row["dice"] for row in rows]),
                "sharding": str(state.params["decoder"]["last_conv_8"]["kernel"].sharding),
            }
        )
    with pytest.raises(sharding.ShardingError) as error:
        sharding.check_batch_size(12, mesh, "config.train.batch_size")
    results["error"] = str(error.value)
    results["padded"] = [sharding.padded_batch_size(n, mesh) for n in (1, 4, 8, 9)]
    Path(out).write_bytes(pickle.dumps(results))


@pytest.fixture(scope="module")
def on_meshes(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharding") / "results.pkl"
    code = f"from tests import test_sharding as t; t.train_and_predict_on_meshes({str(out)!r})"
    result = run_python("-c", code, env={**cpu_env(), "JAX_ENABLE_X64": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return pickle.loads(out.read_bytes())


def assert_trees_close(name: str, actual, expected) -> None:
    """Elementwise rtol 1e-5, plus atol 1e-6 for values near zero (biases that started at 0).

    Prints the largest absolute difference, and the largest relative one among values above
    1e-3 in magnitude.
    """
    paths, expected_leaves = zip(*jax.tree_util.tree_leaves_with_path(expected), strict=True)
    pairs = list(zip(jax.tree.leaves(actual), expected_leaves, strict=True))
    absolute = max(np.abs(a - e).max() for a, e in pairs)
    relative = max(
        np.abs((a - e)[np.abs(e) > 1e-3] / e[np.abs(e) > 1e-3]).max(initial=0.0) for a, e in pairs
    )
    print(f"{name}: max abs diff {absolute:.2e}, max rel diff (|x| > 1e-3) {relative:.2e}")
    for path, (a, e) in zip(paths, pairs, strict=True):
        np.testing.assert_allclose(
            a, e, rtol=1e-5, atol=1e-6, err_msg=f"{name}{jax.tree_util.keystr(path)}"
        )


def test_state_is_replicated_over_the_data_mesh(on_meshes):
    assert "'data': 8" in on_meshes[DEVICES]["sharding"]
    assert "spec=P()" in on_meshes[DEVICES]["sharding"]


@pytest.mark.parametrize("key", ["loss", "params", "batch_stats", "opt_state", "dice"])
def test_eight_devices_match_one_device(on_meshes, key):
    """Gradients and BatchNorm statistics are those of the global batch (synchronised BN).

    The all-reduces add partial sums in another order, so the runs agree to rounding, not
    bit for bit. The model computes in float64 here (float32 params, loss and updates, as
    in training): in float32, a rounding of about 1e-7 that moves a pre-activation across a
    ReLU's kink sends a pixel's gradient another way, and this tiny model's 2x2 layer4 and
    8x8 decoder maps turned that into param differences of 3e-6 to 1e-3 for several of the
    init seeds 1-7 (which ones moved whenever the compiled model changed). In float64 all of
    seeds 1-7 agree to 3e-8.
    """
    assert_trees_close(key, on_meshes[DEVICES][key], on_meshes[1][key])


def test_batches_drawn_on_eight_devices_match_one_device(on_meshes):
    """Augmentation on the devices: each device draws its slice, the same as on one device."""
    assert "'data': 8" in on_meshes[DEVICES]["device_batch_sharding"]
    eight, one = on_meshes[DEVICES]["device_batch"], on_meshes[1]["device_batch"]
    np.testing.assert_array_equal(eight["mask"], one["mask"])
    # Two compilations may round a colour sum differently: one grey level at the most.
    difference = np.abs(eight["image"].astype(int) - one["image"].astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_training_lowered_the_loss_and_scored_every_image(on_meshes):
    losses = on_meshes[1]["loss"]
    assert len(losses) == NUM_STEPS and np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    assert len(on_meshes[1]["dice"]) == len(on_meshes[DEVICES]["dice"]) == 6


def test_eval_batch_size_rounds_up_to_a_multiple_of_the_devices(on_meshes):
    assert on_meshes["padded"] == [8, 8, 8, 16]


def test_batch_size_must_divide_by_the_devices(on_meshes):
    assert on_meshes["error"] == (
        "config.train.batch_size=12 does not divide by the 8 devices; use a multiple of 8."
    )


def test_main_stops_with_one_line_on_an_indivisible_batch(tmp_path):
    workdir = tmp_path / "w"
    args = ["--config=configs/synthetic.py", f"--workdir={workdir}", "--config.train.batch_size=6"]
    result = run_python("main.py", *args, env=cpu_env())
    assert result.returncode != 0
    assert (
        "FATAL config.train.batch_size=6 does not divide by the 8 devices; use a multiple of 8."
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_main_stops_with_one_line_where_the_coordinator_port_is_taken(tmp_path):
    with socket.socket() as taken:  # JAX's service crashed the process on a port in use
        taken.bind(("localhost", free_port()))
        taken.listen()
        address = f"localhost:{taken.getsockname()[1]}"
        args = [
            "--config=configs/synthetic.py",
            f"--workdir={tmp_path / 'w'}",
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address={address}",
            "--config.distributed.num_processes=1",
            "--config.distributed.process_id=0",
        ]
        result = run_python("main.py", *args, env=cpu_env())
    assert result.returncode == 1, result.stderr[-3000:]
    fatal = [line for line in result.stderr.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert fatal == [
        f"FATAL distributed.coordinator_address={address!r}: port {address.split(':')[1]} is in "
        "use on this machine (by an earlier run still alive?), and process 0 must listen on it."
    ]


def test_a_coordinator_that_never_answers_is_named_in_one_line():
    """JAX's own wait for it ends in a C++ abort with a stack dump."""
    config = figaro.get_config().distributed
    address = f"localhost:{free_port()}"  # nothing listens there
    config.update(
        enabled=True,
        coordinator_address=address,
        num_processes=2,
        process_id=1,
        initialization_timeout=2,
    )
    start = time.monotonic()
    with pytest.raises(sharding.ShardingError) as info:
        sharding.initialize_distributed(config)
    assert 2 <= time.monotonic() - start < 10
    assert str(info.value).startswith(
        f"distributed.coordinator_address={address!r}: no coordinator answered in 2 s ("
    )
    assert "\n" not in str(info.value)
    with pytest.raises(sharding.ShardingError, match="host 'nohost.invalid' is unknown"):
        sharding.wait_for_coordinator("nohost.invalid:1234", 60)


# Process 0 of two, whose peer never comes.
LONELY_PROCESS_0 = """
import sys
from configs import figaro
from hairseg_jax import sharding

config = figaro.get_config().distributed
config.update(enabled=True, coordinator_address=sys.argv[1], num_processes=2, process_id=0)
config.initialization_timeout = 3
sharding.initialize_distributed(config)
print("joined")
"""


def test_processes_that_never_all_join_end_with_one_line_at_the_timeout():
    """JAX's own wait for them ended, later than the timeout, in a C++ abort (status 134)."""
    start = time.monotonic()
    result = run_python("-c", LONELY_PROCESS_0, f"localhost:{free_port()}", timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert 3 <= time.monotonic() - start < 30 and "joined" not in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "FATAL distributed: the 2 processes did not all join in 3 s (distributed."
        "initialization_timeout). Start every process with the same coordinator_address and "
        "num_processes, and its own process_id."
    )


@pytest.mark.parametrize("address", ["localhost", "localhost:70000"])
def test_a_bad_jax_coordinator_address_variable_is_named(monkeypatch, address):
    """JAX reads it where the config gives no address: it ended in an IndexError traceback."""
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", address)
    config = figaro.get_config().distributed
    config.update(enabled=True, num_processes=1, process_id=0)
    with pytest.raises(sharding.ShardingError) as info:
        sharding.initialize_distributed(config)
    assert str(info.value) == (
        f"$JAX_COORDINATOR_ADDRESS={address!r} must be HOST:PORT, PORT in 1-65535."
    )


def test_the_checks_of_the_coordinator_name_the_variable_that_gave_it(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("localhost", free_port()))
        taken.listen()
        address = f"localhost:{taken.getsockname()[1]}"
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", address)
        config = figaro.get_config().distributed
        config.update(enabled=True, num_processes=1, process_id=0)
        with pytest.raises(sharding.ShardingError, match="^.JAX_COORDINATOR_ADDRESS='localhost:"):
            sharding.initialize_distributed(config)


def test_the_wait_for_the_coordinator_ends_when_it_listens():
    with socket.socket() as coordinator:
        coordinator.bind(("localhost", free_port()))
        threading.Timer(1.5, coordinator.listen).start()  # process 0 starts late
        start = time.monotonic()
        sharding.wait_for_coordinator(f"localhost:{coordinator.getsockname()[1]}", 30)
        assert 1.5 <= time.monotonic() - start < 10


def test_an_ipv6_coordinator_address_in_brackets_is_reached():
    if not socket.has_ipv6:
        pytest.skip("this machine has no IPv6")  # not the dataset: no CI failure needed
    with socket.socket(socket.AF_INET6) as coordinator:
        try:
            coordinator.bind(("::1", 0))
        except OSError as e:
            pytest.skip(f"this machine cannot listen on ::1 ({e})")
        coordinator.listen()
        sharding.wait_for_coordinator(f"[::1]:{coordinator.getsockname()[1]}", 5)


# Two processes of 2 CPU devices each, joined by jax.distributed.


def tiny_run(mesh: jax.sharding.Mesh) -> dict:
    """Two train steps on this process's slices of the pipeline's batches, then predictions
    of 8 whole images; the results as NumPy arrays."""
    config = figaro.get_config()
    examples = make_examples(16, size=24, seed=2)
    state = steps.create_train_state(
        jax.random.PRNGKey(0), TinyNet(), 16, optax.sgd(0.1), mesh=mesh
    )
    train, predict = steps.jit_steps(config, mesh)
    batches = pipeline.train_batches(
        examples, 8, 16, config.augment, 0, 0, jax.process_index(), jax.process_count()
    )
    losses = []
    for _ in range(2):
        state, metrics = train(state, sharding.shard_batch(next(batches), mesh))
        losses.append(metrics["loss"])
    images = np.stack(examples.images[:8])
    logits = predict(state, sharding.shard_batch(images, mesh, whole=True))
    return jax.device_get(
        {"params": state.params, "batch_stats": state.batch_stats, "loss": losses, "logits": logits}
    )


def join_two(config: ml_collections.ConfigDict, process_id: int, port: int) -> None:
    """Joins as ``process_id`` of 2 processes, through a coordinator on ``port`` of this
    machine (``config``: a ``distributed`` section)."""
    config.update(
        enabled=True,
        coordinator_address=f"localhost:{port}",
        num_processes=2,
        process_id=process_id,
    )
    sharding.initialize_distributed(config)


def process_worker(process_id: int, port: int, out: str) -> None:
    """Subprocess body: one of 2 processes; process 0 pickles ``tiny_run``'s results."""
    join_two(figaro.get_config().distributed, process_id, port)
    assert (jax.process_count(), jax.device_count()) == (2, 4)
    mesh = sharding.data_mesh()  # process 0's devices first: its rows of each batch come first
    assert [device.process_index for device in mesh.devices] == [0, 0, 1, 1]
    results = tiny_run(mesh)
    if jax.process_index() == 0:
        Path(out).write_bytes(pickle.dumps(results))


def free_port() -> int:
    """A free port for a coordinator, below the ephemeral range: one that bind(0) draws there can
    be drawn again for another connection before the coordinator binds it (it then waits for
    its clients until the test times out)."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    first = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    for port in random.sample(range(10000, first), 200):
        with socket.socket() as free:
            try:
                free.bind(("localhost", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"No free port in 10000-{first - 1}.")


def test_two_processes_train_and_predict_like_one_device(tmp_path):
    """Each process feeds its half of every global batch; the results are those of 1 device."""
    port = free_port()
    out = tmp_path / "results.pkl"
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from tests import test_sharding as t; "
                f"t.process_worker({i}, {port}, {str(out)!r})",
            ],
            cwd=REPO,
            env=cpu_env(2),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        errors = [worker.communicate(timeout=300)[1] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, error in zip(workers, errors, strict=True):
        assert worker.returncode == 0, error[-3000:]
    expected = tiny_run(sharding.data_mesh(jax.devices()[:1]))
    assert_trees_close("2 processes", pickle.loads(out.read_bytes()), expected)


def preempted_worker(process_id: int, port: int, workdir: str, failing_events: int = 0) -> None:
    """Subprocess body: one of 2 processes training ``TinyNet`` with ``train_and_evaluate``
    (the loop a preemption notice must stop) until told to stop; with ``failing_events``,
    process 0's TensorBoard events cannot be written from that step on."""
    from absl import logging
    from clu import asynclib

    from hairseg_jax import train

    create_writer = train.metric_writers.create_default_writer

    def failing_writer(*args, **kwargs):
        writer = create_writer(*args, **kwargs)
        write_scalars = writer.write_scalars

        def write(step, scalars):
            if failing_events and process_id == 0 and step >= failing_events:
                raise asynclib.AsyncError("No space left on device")
            return write_scalars(step, scalars)

        writer.write_scalars = write
        return writer

    train.metric_writers.create_default_writer = failing_writer
    if process_id == 1:  # only process 0 writes config.json (a copy would look the same)

        def write_config(*args, **kwargs):
            raise AssertionError("process 1 wrote config.json")

        train.write_config = write_config

    logging.set_verbosity("info")  # the step log the test waits for
    logging.set_stderrthreshold("info")
    config = synthetic.get_config()
    config.data.update(synthetic_size=24, image_size=16)
    config.data.synthetic_counts.update(train=32, val=4)
    config.train.update(batch_size=4, num_steps=10**6, eval_every_steps=10**6, log_every_steps=1)
    join_two(config.distributed, process_id, port)
    models.build_model = lambda model_config: TinyNet()  # the loop is under test, not the model
    train.train_and_evaluate(config, workdir)


def start_workers(worker: str, args: str, logs: list[Path], devices: int = 1) -> list:
    """Two processes, each calling ``worker`` of this module with its process id, the
    coordinator's port and ``args`` (Python source), their stderr in ``logs``."""
    port, workers = free_port(), []
    for i, log in enumerate(logs):
        code = f"from tests import test_sharding as t; t.{worker}({i}, {port}, {args})"
        with log.open("w") as stderr:
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-c", code],
                    cwd=REPO,
                    env=cpu_env(devices),
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            )
    return workers


def wait_for(workers: list, logs: list[Path], timeout: float) -> list[str]:
    """The ``logs`` of ``workers`` once they end (killed after ``timeout`` seconds each)."""
    try:
        for worker in workers:
            worker.wait(timeout=timeout)
    finally:
        for worker in workers:
            worker.kill()
    return [log.read_text() for log in logs]


def eval_config():
    """Synthetic images scored at 16 px; 5 test images, so the 4 devices of 2 processes pad."""
    config = synthetic.get_config()
    config.data.update(synthetic_size=24, image_size=16)
    config.data.synthetic_counts.update(val=4, test=5)
    config.eval.update(image_size=16, batch_size=4, tune_threshold=True)
    return config


def evaluate_worker(process_id: int, port: int, workdir: str) -> None:
    """Subprocess body: one of 2 processes evaluating ``workdir``'s best ``TinyNet``, then
    predicting the images of its folders ``refused`` and ``full``, where process 0 cannot
    write the outputs of files named ``*refused*`` (a name the filesystem refuses) and
    ``*full*`` (a full disk); process 1 writing any file fails it. Writes what each
    prediction returned or raised to ``predict<process_id>.json``."""
    from hairseg_jax import files, predict

    config = eval_config()
    join_two(config.distributed, process_id, port)
    models.build_model = lambda model_config: TinyNet()
    write = files.write_atomically

    def write_atomically(path, data):
        if process_id == 1:
            raise AssertionError(f"process 1 wrote {path}")
        for name, code in (("refused", errno.EINVAL), ("full", errno.ENOSPC)):
            if name in Path(path).name:
                raise OSError(code, os.strerror(code), str(path))
        write(path, data)

    files.write_atomically = write_atomically
    evaluate.evaluate(config, workdir)
    results = {}
    for name in ("refused", "full"):
        config.predict.update(
            input=f"{workdir}/{name}", output=f"{workdir}/{name}_out", batch_size=4
        )
        try:
            summary = predict.predict(config, workdir)
            results[name] = {key: summary[key] for key in ("num_written", "failed")}
        except OSError as e:
            results[name] = str(e)
    Path(workdir, f"predict{process_id}.json").write_text(json.dumps(results))


def test_two_processes_evaluate_as_one_and_only_process_0_writes(tmp_path, monkeypatch):
    """2 processes of 2 devices (5 images padded to 8 a batch) tune the threshold and score
    as one process does; process 1 writes none of the reports. Predicting, both report the
    files whose outputs process 0 could not write, and both stop where process 0 cannot go
    on (process 1 reported none, or waited for process 0 in the next batch)."""
    variables = random_variables(TinyNet(), 16)
    for name in ("one", "two"):
        best = checkpoints.best_manager(tmp_path / name)
        checkpoints.save(best, 3, variables, metrics={checkpoints.BEST_METRIC: 0.5})
        best.wait_until_finished()
    inputs = {"refused": ["a", "b_refused", "c"], "full": ["a_full", *"bcdefghi"]}
    for folder, names in inputs.items():
        (tmp_path / "two" / folder).mkdir()
        for name in names:
            Image.new("RGB", (12, 10), (120, 90, 60)).save(
                tmp_path / "two" / folder / f"{name}.png"
            )
    monkeypatch.setattr(models, "build_model", lambda model_config: TinyNet())
    single = evaluate.evaluate(eval_config(), tmp_path / "one")
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    workers = start_workers("evaluate_worker", f"'{tmp_path / 'two'}'", logs, devices=2)
    texts = wait_for(workers, logs, timeout=120)
    for worker, text in zip(workers, texts, strict=True):
        assert worker.returncode == 0, text[-3000:]
    report = json.loads((tmp_path / "two" / "eval_test.json").read_text())
    assert report["num_images"] == single["num_images"] == 5
    for key in ("dice", "pooled_dice", "iou", "threshold"):
        np.testing.assert_allclose(report[key], single[key], rtol=1e-6)
    rows = [(tmp_path / name / "eval_test.csv").read_text().splitlines() for name in ("one", "two")]
    assert [row.split(",")[:3] for row in rows[0]] == [row.split(",")[:3] for row in rows[1]]
    refused = {"num_written": 2, "failed": [str(tmp_path / "two" / "refused" / "b_refused.png")]}
    full = (
        f"[Errno 28] No space left on device: '{tmp_path / 'two' / 'full_out' / 'a_full_mask.png'}'"
    )
    assert json.loads((tmp_path / "two" / "predict0.json").read_text()) == {
        "refused": refused,
        "full": full,
    }
    assert json.loads((tmp_path / "two" / "predict1.json").read_text()) == {
        "refused": refused,
        "full": "Process 0 cannot write predict's outputs (its log says why).",
    }
    assert sorted(os.listdir(tmp_path / "two" / "refused_out")) == [
        f"{name}{suffix}" for name in "ac" for suffix in ("_mask.png", "_overlay.jpg")
    ]


@pytest.mark.parametrize(
    "signum, process", [(signal.SIGTERM, 1), (signal.SIGINT, 0)], ids=["sigterm", "ctrl-c"]
)
def test_sigterm_or_ctrl_c_to_one_of_two_processes_stops_both_at_one_step(
    tmp_path, signum, process
):
    """A preemption notice or a Ctrl-C to one host: both save the same step and exit 0; only
    process 0 writes the config and metrics. (Ctrl-C stopped its own process alone, and the
    other waited in the step's all-reduce.)"""
    workdir = tmp_path / "w"
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    workers = start_workers("preempted_worker", f"'{workdir}'", logs)
    try:
        for _ in range(3000):  # until the process has trained a few steps, at most 5 minutes
            log = logs[process].read_text()
            if "[3] learning_rate" in log or workers[process].poll() is not None:
                break
            time.sleep(0.1)
        workers[process].send_signal(signum)
    finally:
        texts = wait_for(workers, logs, timeout=300)
    for worker, text in zip(workers, texts, strict=True):
        assert worker.returncode == 0, text[-3000:]
    stops = [re.findall(r"Stopped at step (\d+);", text) for text in texts]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops
    step = int(stops[0][0])
    assert 3 <= step < 10**6
    assert os.listdir(workdir / "checkpoints") == [str(step)]
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
    assert (workdir / "config.json").is_file()


def test_events_that_process_0_cannot_write_stop_both_at_one_saved_step(tmp_path):
    """Process 0 stopping alone left process 1 waiting in the step's all-reduce for minutes:
    now both save the same step, process 0 then reports the error, process 1 exits 0."""
    workdir = tmp_path / "w"
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    workers = start_workers("preempted_worker", f"'{workdir}', 3", logs)
    texts = wait_for(workers, logs, timeout=120)
    assert [worker.returncode for worker in workers][1] == 0, texts[1][-3000:]
    assert workers[0].returncode != 0 and "Cannot write the TensorBoard events" in texts[0]
    stops = [re.findall(r"Stopped at step (\d+);", text) for text in texts]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops
    assert os.listdir(workdir / "checkpoints") == stops[0]


# In-process, on this process's devices.


def test_shard_batch_of_a_local_slice_and_of_the_whole_batch_agree():
    mesh = sharding.data_mesh()
    batch = {"image": np.arange(2 * mesh.size * 3).reshape(2 * mesh.size, 3)}
    for whole in (False, True):
        sharded = sharding.shard_batch(batch, mesh, whole=whole)
        assert sharded["image"].sharding == sharding.batch_sharded(mesh)
        np.testing.assert_array_equal(sharded["image"], batch["image"])


@pytest.mark.parametrize(
    "error, why",
    [
        (AssertionError(), "its plugin is not installed (for CUDA: pip install -e '.[cuda]')"),
        (RuntimeError("Unable to initialize backend 'tpu': no libtpu\n(more)"), "Unable to init"),
    ],
)
def test_a_backend_that_cannot_start_is_named_in_one_line(monkeypatch, error, why):
    """JAX asserts, with no message, for a platform whose plugin is missing (JAX_PLATFORMS=cuda
    on a CPU-only install), and raises a RuntimeError for one that fails to start."""
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")

    def devices():
        raise error

    monkeypatch.setattr(sharding.jax, "devices", devices)
    with pytest.raises(sharding.ShardingError) as info:
        sharding.start_backend()
    message = str(info.value)
    assert message.startswith(f"JAX cannot start its backend (JAX_PLATFORMS='cuda'): {why}")
    assert "\n" not in message
