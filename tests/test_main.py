"""End to end: ``main.py`` trains, resumes and evaluates on a handful of real Figaro1k images."""

import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import figaro
from hairseg_jax.data import figaro1k
from tests.conftest import REPO, run_python


def run_main(
    *args: str, figaro_dir: Path | None = None, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """Runs ``main.py`` with the smoke config in a subprocess and returns its result."""
    data = [f"--config.data.data_dir={figaro_dir}"] if figaro_dir else []
    return run_python("main.py", "--config=configs/figaro.py:smoke", *data, *args, env=env)


@pytest.fixture(scope="module")
def trained(figaro_dir, tmp_path_factory) -> Path:
    """A workdir after the smoke run: 20 steps, checkpoints at steps 10 and 20."""
    workdir = tmp_path_factory.mktemp("smoke")
    # The tests' own cache ($JAX_COMPILATION_CACHE_DIR) is used instead of the config's.
    unused = workdir.parent / "unused_cache"
    result = run_main(
        f"--workdir={workdir}", f"--config.compilation_cache={unused}", figaro_dir=figaro_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not unused.exists()
    return workdir


def test_training_writes_events_checkpoints_and_config(trained):
    assert list(trained.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["10", "20"]
    assert len(list((trained / "best").iterdir())) == 1
    saved = json.loads((trained / "config.json").read_text())
    assert saved["model"]["backbone"] == "resnet18"
    assert saved["train"]["num_steps"] == 20


def test_eval_reports_dice_at_original_resolution(trained, figaro_dir, tmp_path):
    """Also: the compiled steps go to config.compilation_cache (with no cache in the
    environment; every compile cached, however quick)."""
    cache = tmp_path / "cache"
    result = run_main(
        f"--workdir={trained}",
        "--config.mode=eval",
        f"--config.compilation_cache={cache}",
        figaro_dir=figaro_dir,
        env={"JAX_COMPILATION_CACHE_DIR": None, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(cache.glob("jit_predict_step-*"))
    summary = json.loads((trained / "eval_test.json").read_text())
    assert summary["num_images"] == 8 and summary["split"] == "test"
    for key in ("dice", "pooled_dice", "iou", "accuracy"):
        assert 0.0 <= summary[key] <= 1.0
    # The smoke model has learnt something (0.68 and 0.74 on 2026-12-07; random or inverted
    # masks score far less).
    assert summary["dice"] > 0.55 and summary["accuracy"] > 0.6, summary
    rows = (trained / "eval_test.csv").read_text().splitlines()
    assert rows[0].startswith("name,height,width,dice")
    assert len(rows) == 1 + 8
    dice = [float(row.split(",")[3]) for row in rows[1:]]
    np.testing.assert_allclose(np.mean(dice), summary["dice"], rtol=1e-6)
    # Each row is scored at the image's own size, not the 96 px model input.
    all_test = json.loads((figaro_dir / "train_val_test.json").read_text())["test"]
    test_entries = figaro1k.spread(all_test, 8)
    from PIL import Image

    for row, entry in zip(rows[1:], test_entries, strict=True):
        name, height, width = row.split(",")[:3]
        with Image.open(figaro_dir / "GT" / "images" / entry["image"]) as image:
            assert (int(width), int(height)) == image.size
        assert name == entry["image"].removesuffix("-org.jpg")


def test_a_compilation_cache_that_cannot_be_a_folder_is_a_warning():
    """Runs go on without a cache (e.g. a read-only home), saying why."""
    code = (
        "import jax, main\n"
        "main.use_compilation_cache('/proc/no/cache')\n"
        "assert jax.config.jax_compilation_cache_dir is None\n"
        "main.use_compilation_cache('')  # '' keeps none, silently\n"
        "assert jax.config.jax_compilation_cache_dir is None\n"
    )
    result = run_python("-c", code, env={"JAX_COMPILATION_CACHE_DIR": None})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Compiling without a cache: config.compilation_cache='/proc/no/cache'" in result.stderr
    assert "config.compilation_cache=''" not in result.stderr


def test_restart_resumes_from_latest_checkpoint(trained, figaro_dir, tmp_path):
    """Losing the step-20 checkpoint (a crash after step 10) and rerunning continues at 10."""
    workdir = tmp_path / "resumed"
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("eval_*", "events.*"))
    shutil.rmtree(workdir / "checkpoints" / "20")
    result = run_main(f"--workdir={workdir}", figaro_dir=figaro_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from step 10" in result.stderr
    assert "[15] learning_rate" in result.stderr and "[5] learning_rate" not in result.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "20"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.nope=3", "Bad config override (--config.train.nope=3): no such field"),
        ("--config.trian.batch_size=3", 'Did you mean "train"'),
        ("--config.train.batch_size=abc", "invalid literal for int()"),
        ("--config.input.mean=abc", "input.mean=('abc',) must hold numbers"),
        ("--config.mode=bogus", "mode='bogus' is not one of ('train', 'eval', 'predict')"),
        ("--config.optim.learning_rate=-1", "optim.learning_rate=-1.0 must be positive"),
        ("--config.model.backbone=resnet13", "model.backbone='resnet13' is not one of"),
        ("--config.data.data_dir=/no/such/dir", "Data directory /no/such/dir does not exist"),
        ("--nope=1", "FATAL Flags parsing error: Unknown command line flag 'nope'"),
        ("stray", "FATAL Unexpected arguments: stray (flags are --name=value)"),
    ],
)
def test_bad_input_gives_one_clear_line(override, message, tmp_path):
    workdir = tmp_path / "w"
    result = run_main(f"--workdir={workdir}", override)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]  # after the config, where it was read
    assert last.startswith("FATAL") and message in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_a_misspelt_override_is_named_alone(tmp_path):
    result = run_main(
        f"--workdir={tmp_path / 'w'}", "--config.train.batch_size=8", "--config.train.batchsize=8"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        "FATAL Bad config override (--config.train.batchsize=8): no such field 'batchsize'"
    ) in result.stderr


@pytest.mark.parametrize(
    "spec, message",
    [
        ("configs/none.py", "Cannot load the --config file: [Errno 2] No such file or directory"),
        (
            "configs/figaro.py:smok",
            "FATAL Cannot load the --config file: ValueError: Unknown variant 'smok' of "
            "configs/figaro.py; known: smoke, scratch.\n",
        ),
        ("configs/figaro_cpu.py:smoke", "file: it has no variants (the ':name' after the file's"),
    ],
)
def test_a_bad_config_file_gives_one_clear_line(spec, message, tmp_path):
    result = run_python("main.py", f"--config={spec}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "source, message",
    [
        ("def get_config(:\n", "SyntaxError: invalid syntax (bad.py, line 1)"),
        ("import nosuchmod\n", "ModuleNotFoundError: No module named 'nosuchmod'"),
        ("def get_config():\n    return None\n", "its get_config() returned None"),
        ("x = 1\n", "it defines no get_config()."),
        ("def get_config():\n    return {}['x']\n", "KeyError: 'x'"),
    ],
    ids=["syntax", "import", "none", "no get_config", "its error"],
)
@pytest.mark.parametrize("overrides", [[], ["--config.train.num_steps=2"]], ids=["", "override"])
def test_a_config_file_that_does_not_load_gives_one_clear_line(
    source, message, overrides, tmp_path
):
    """With an override too: it was blamed for the None that get_config() returned."""
    (tmp_path / "bad.py").write_text(source)
    result = run_python(
        "main.py", f"--config={tmp_path / 'bad.py'}", f"--workdir={tmp_path}", *overrides
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"FATAL Cannot load the --config file: {message}" in result.stderr


def test_a_shipped_config_loaded_from_elsewhere_says_where_to_run(tmp_path):
    """configs/synthetic.py imports configs.figaro, found only from the repository's root."""
    result = run_python(
        "-m",
        "hairseg_jax.export",
        f"--config={REPO / 'configs' / 'synthetic.py'}",
        f"--workdir={tmp_path}",
        f"--out={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        "FATAL Cannot load the --config file: ModuleNotFoundError: No module named 'configs' "
        "(the shipped configs import configs.figaro: run from the repository's root)"
    ) in result.stderr


def test_a_config_lacking_a_section_names_it(tmp_path):
    (tmp_path / "partial.py").write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'mode': 'train'})\n"
    )
    result = run_python("main.py", f"--config={tmp_path / 'partial.py'}", f"--workdir={tmp_path}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "FATAL Bad config: it has no field 'augment', 'compilation_cache', 'data', " in (
        result.stderr
    )


def test_a_damaged_checkpoint_gives_one_clear_line(trained, tmp_path):
    workdir = tmp_path / "damaged"
    shutil.copytree(trained, workdir)
    step = next(p for p in (workdir / "best").iterdir() if p.name.isdigit())
    for data in step.rglob("d/*"):  # the arrays' bytes, cut short
        data.write_bytes(data.read_bytes()[:10])
    result = run_main(f"--workdir={workdir}", "--config.mode=eval")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        f"FATAL The checkpoint at step {step.name} of {workdir / 'best'} cannot be read ("
    ) in result.stderr


def test_a_workdir_that_cannot_be_a_folder_gives_one_clear_line(figaro_dir, tmp_path):
    taken = tmp_path / "a_file"
    taken.write_text("")
    result = run_main(f"--workdir={taken / 'w'}", figaro_dir=figaro_dir)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = f"FATAL --workdir='{taken / 'w'}' cannot be made a folder ({taken} is a file)."
    assert message in result.stderr
    assert "Reading" not in result.stderr  # before the data


def test_distributed_without_a_cluster_or_coordinator_gives_one_clear_line(tmp_path):
    """In a fresh process (JAX refuses to join once started), with no cluster to detect."""
    cluster = ("SLURM_", "OMPI_", "JAX_COORDINATOR", "KUBERNETES_", "TPU_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cluster)}
    command = [sys.executable, "main.py", "--config=configs/figaro.py:smoke"]
    command += [f"--workdir={tmp_path / 'w'}", "--config.distributed.enabled=True"]
    result = subprocess.run(
        command, cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "distributed.enabled=True, but the processes cannot join (" in result.stderr
    assert "pass --config.distributed.coordinator_address" in result.stderr


def test_paths_and_settings_that_would_fail_later_are_named_before_any_work(tmp_path):
    """An empty --workdir (an unset shell variable), ``~`` (which the shell leaves in
    ``--flag=~/x``), distributed settings without distributed.enabled, a missing pretrained
    file, a ``~user`` of no user, a file as the workdir, config fields missing, and the host's
    or the accelerator's memory running out: one line each from main.run, in one process,
    before any folder is made."""
    code = f"""
import jax
import main
from configs import figaro
from hairseg_jax import evaluate

def out_of_memory(config, workdir):
    raise MemoryError("Unable to allocate 37.3 TiB for an array")

def out_of_device_memory(config, workdir):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB.\\nmore")

def a_compiler_bug(config, workdir):
    raise jax.errors.JaxRuntimeError("INTERNAL: a compiler bug")

def attempt(workdir, *missing, **fields):
    config = figaro.get_config("smoke")
    config.update_from_flattened_dict(fields)
    for field in missing:
        section, name = field.split(".")
        del config[section][name]
    try:
        main.run(config, workdir)
    except SystemExit as e:
        print(e.code)

attempt("")
attempt("~/w", mode="eval")
attempt("{tmp_path / "w"}", **{{"data.data_dir": "~/nofig"}})
attempt("{tmp_path / "w"}", **{{"distributed.process_id": 0}})
attempt("{tmp_path / "w"}", **{{"model.pretrained": "~/gone.pth"}})
attempt("~hairseg-no-such-user/w")
attempt("{tmp_path / "w"}", **{{"predict.input": "~hairseg-no-such-user/*.jpg"}})
attempt("{tmp_path / "file"}", mode="eval")
attempt("{tmp_path / "w"}", "data.split_file", "train.skip_nonfinite")
evaluate.evaluate = out_of_memory  # as NumPy's for a mistyped eval.image_size=100000
attempt("{tmp_path / "w"}", mode="eval")
evaluate.evaluate = out_of_device_memory
attempt("{tmp_path / "w"}", mode="eval")
evaluate.evaluate = a_compiler_bug  # not called out of memory: its traceback stays
try:
    attempt("{tmp_path / "w"}", mode="eval")
except jax.errors.JaxRuntimeError as e:
    print("raised", e)
"""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "file").write_text("")
    result = run_python("-c", code, env={"HOME": str(home)})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "FATAL --workdir is empty: it must name a folder.",
        f"FATAL No best checkpoint in {home / 'w' / 'best'} and no config.model.pretrained; "
        "train there first.",
        f"FATAL Data directory {home / 'nofig'} does not exist; point config.data.data_dir "
        "at a Figaro1k folder (see data/README.md).",
        "FATAL Bad config: distributed.process_id=0 is set, but distributed.enabled is False: "
        "enable it to join the other processes.",
        f"FATAL Pretrained weights not found: {home / 'gone.pth'}",
        "FATAL --workdir='~hairseg-no-such-user/w': there is no user 'hairseg-no-such-user' "
        "('~/' is your home).",
        "FATAL predict.input='~hairseg-no-such-user/*.jpg': there is no user "
        "'hairseg-no-such-user' ('~/' is your home).",
        f"FATAL --workdir='{tmp_path / 'file'}' is a file, not a folder.",
        "FATAL Bad config: it has no field 'data.split_file', 'train.skip_nonfinite'. A config "
        "file should start from one of configs/*.py (e.g. configs.figaro.get_config()) and "
        "change fields.",
        "FATAL Out of host memory in eval mode (Unable to allocate 37.3 TiB for an array): "
        "lower the sizes.",
        "FATAL Out of accelerator memory in eval mode (RESOURCE_EXHAUSTED: Out of memory "
        "allocating 9 GiB.): lower the batch size or the image size, or set "
        "model.dtype=bfloat16.",
        "raised INTERNAL: a compiler bug",
    ]
    assert not (tmp_path / "w").exists() and not (home / "w").exists()  # no folder made


def test_missing_workdir_gives_one_clear_line():
    result = run_main()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Flag --workdir must have a value other than None" in result.stderr


def test_eval_without_checkpoint_fails_clearly(tmp_path):
    result = run_main(f"--workdir={tmp_path}", "--config.mode=eval")
    assert result.returncode != 0
    assert "No best checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_sigterm_checkpoints_and_exits_cleanly(figaro_dir, tmp_path):
    """A preempted run (SIGTERM mid-training) saves its step and exits 0."""
    workdir = tmp_path / "preempted"
    args = [  # the smoke run's step (a compile cache hit), with no evaluation or save before 20
        f"--workdir={workdir}",
        "--config.train.eval_every_steps=20",
        "--config.train.log_every_steps=2",
    ]
    command = [sys.executable, "main.py", "--config=configs/figaro.py:smoke", *args]
    command.append(f"--config.data.data_dir={figaro_dir}")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "[4] learning_rate" in line:
            process.send_signal(signal.SIGTERM)
            break
    rest = process.communicate(timeout=300)[1]
    log = "".join(seen) + rest
    assert process.returncode == 0, log[-3000:]
    assert "SIGTERM received" in log
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir()]
    assert len(saved) == 1 and 4 <= saved[0] < 20
    assert f"Stopped at step {saved[0]}; the same command resumes from it." in log
    # A complete train state of that step (resuming from one: the restart test above).
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(saved[0]) / "default")
    assert int(state["step"]) == saved[0]
    assert {"params", "opt_state", "batch_stats"} <= state.keys()


def test_an_interrupt_exits_130_with_one_line(monkeypatch, capsys):
    import main  # here: importing it defines its absl flags

    def interrupted(config, workdir):
        raise KeyboardInterrupt

    def exit_now(status: int):  # here: cli.interrupted's os._exit would end pytest's process
        raise SystemExit(status)

    monkeypatch.setattr(main, "run", interrupted)
    monkeypatch.setattr(
        main,
        "FLAGS",
        types.SimpleNamespace(config=types.SimpleNamespace(mode="train"), workdir="w"),
    )
    monkeypatch.setattr(os, "_exit", exit_now)
    with pytest.raises(SystemExit) as exit_info:
        main.main(["main.py"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "FATAL Interrupted in train mode."


def test_run_quiets_the_libraries_before_any_work(monkeypatch):
    """orbax's INFO chatter and tracebacks are left out of every mode's log."""
    import main

    quieted = []
    monkeypatch.setattr(main.cli, "quiet_libraries", lambda: quieted.append(True))
    with pytest.raises(SystemExit, match="--workdir is empty"):
        main.run(figaro.get_config("smoke"), "")
    assert quieted == [True]
