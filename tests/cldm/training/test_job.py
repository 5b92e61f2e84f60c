"""tutorial_train.py / tutorial_train_dist.py on the tiny config, on the CPU."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import tool_make_fill50k
import tutorial_train
from cldm.cli import run
from cldm.model import create_model, load_state_dict, load_weights
from cldm.checkpoints.surgery import add_control
from cldm.checkpoints.random_weights import random_base_state_dict
from tests.helpers.paths import REPO_ROOT, TINY_CONFIG as TINY_CONFIG_PATH


TINY_CONFIG = str(TINY_CONFIG_PATH)
IMAGE_NAME = re.compile(r"^(reconstruction|control|conditioning|samples_cfg_scale_9\.00)_gs-\d{6}_e-\d{6}_b-\d{6}\.png$")


def _make_data(folder: Path, count: int) -> Path:
    assert tool_make_fill50k.main(["--out", str(folder), "--count", str(count), "--size", "64", "--quiet"]) == 0
    return folder


def make_initial_weights(path: Path, config: str = TINY_CONFIG) -> Path:
    """What tool_add_control.py makes from a (random, non-degenerate) tiny "Stable Diffusion" checkpoint."""
    model = create_model(config)
    merged, _ = add_control(model.state_dict(), random_base_state_dict(config, seed=0))
    torch.save(merged, path)
    return path


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory) -> Path:
    return make_initial_weights(tmp_path_factory.mktemp("init") / "control_tiny_ini.ckpt")


@pytest.fixture(scope="module")
def data20(tmp_path_factory) -> Path:
    return _make_data(tmp_path_factory.mktemp("data") / "fill", 20)


def _args(initial: Path, data: Path, root: Path, *extra: str) -> list[str]:
    return ["--config", TINY_CONFIG, "--resume_path", str(initial), "--data_root", str(data), "--batch_size", "4",
            "--accelerator", "cpu", "--default_root_dir", str(root), "--seed", "3", "--log_ddim_steps", "2",
            *extra]


def _control_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_state_dict(checkpoint).items() if k.startswith("control_model.")}


def test_training_writes_images_metrics_and_a_strictly_loadable_checkpoint(initial_weights, data20, tmp_path,
                                                                           capsys):
    root = tmp_path / "run"
    argv = _args(initial_weights, data20, root, "--max_steps", "3", "--logger_freq", "2",
                 "--checkpoint_every_n_steps", "2")
    assert tutorial_train.main(argv) == 0

    # tqdm's bar: step rate (s/it when slower than 1 it/s) and the loss, whether or not `rich` is installed.
    progress = capsys.readouterr().out  # Lightning's tqdm bars write to stdout
    assert re.search(r"Epoch 0: .*[0-9.]+(s/it|it/s).*train/loss_simple_step=", progress), progress[-2000:]

    images = sorted(os.listdir(root / "image_log" / "train"))
    assert images and all(IMAGE_NAME.match(name) for name in images), images
    assert {name.split("_gs-")[0] for name in images} == {"reconstruction", "control", "conditioning",
                                                           "samples_cfg_scale_9.00"}
    assert any(name.endswith("_e-000000_b-000000.png") for name in images)  # batch 0 is logged, as the original

    metrics = list(csv.DictReader(open(next((root / "lightning_logs").rglob("metrics.csv")))))
    losses = [float(row["train/loss_simple_step"]) for row in metrics if row.get("train/loss_simple_step")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    # Saved every 2 steps, and the final step 3 too; last.ckpt links to the newest.
    checkpoints = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt", "step-0000002.ckpt", "step-0000003.ckpt"]
    assert (root / "checkpoints" / "last.ckpt").readlink() == Path("step-0000003.ckpt")
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    model = create_model(TINY_CONFIG)
    load_weights(model, load_state_dict(root / "checkpoints" / "last.ckpt"), source="last.ckpt")


@pytest.mark.slow
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(initial_weights, data20, tmp_path):
    # 20 samples / batch 4: the first run stops at an epoch boundary. (Runs stopped by --max_steps mid-epoch:
    # tests/cldm/training/test_resume.py; runs interrupted by a signal or a crash: test_crash_resume.py.)
    first_steps = 5
    common = ("--logger_freq", "1000", "--checkpoint_every_n_steps", "5")
    straight = tmp_path / "straight"
    assert tutorial_train.main(_args(initial_weights, data20, straight, "--max_steps", "10", *common)) == 0
    resumed = tmp_path / "resumed"
    assert tutorial_train.main(_args(initial_weights, data20, resumed, "--max_steps", str(first_steps), *common)) == 0
    assert tutorial_train.main(_args(initial_weights, data20, resumed, "--max_steps", "10", *common,
                                     "--resume_from_checkpoint", "last")) == 0

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 10
    for key, value in _control_weights(straight / "checkpoints" / "last.ckpt").items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_optimizer_in_backward_trains_and_checkpoints_like_adamw(initial_weights, data20, tmp_path):
    common = ("--max_steps", "5", "--logger_freq", "1000", "--checkpoint_every_n_steps", "5")
    assert tutorial_train.main(_args(initial_weights, data20, tmp_path / "adamw", *common)) == 0
    assert tutorial_train.main(_args(initial_weights, data20, tmp_path / "in_backward", *common,
                                     "--optimizer_in_backward")) == 0

    a = torch.load(tmp_path / "adamw" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "in_backward" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 5
    for key, value in _control_weights(tmp_path / "adamw" / "checkpoints" / "last.ckpt").items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6)
    states_a, states_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert states_a.keys() == states_b.keys() and len(states_a) > 0
    for index, state in states_a.items():
        torch.testing.assert_close(states_b[index]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-4, atol=1e-12)
        assert float(states_b[index]["step"]) == float(state["step"]) == 5


def test_leanest_recipe_trains_in_bf16_with_float32_control_weights(initial_weights, data20, tmp_path):
    root = tmp_path / "lean"
    argv = _args(initial_weights, data20, root, "--max_steps", "3", "--logger_freq", "2", "--precision", "bf16-mixed",
                 "--frozen_dtype", "bfloat16", "--optimizer_in_backward")
    assert tutorial_train.main(argv) == 0

    assert any(name.startswith("samples_cfg_scale_9.00") for name in os.listdir(root / "image_log" / "train"))
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    weights = checkpoint["state_dict"]
    assert {weights[key].dtype for key in weights if key.startswith("control_model.")} == {torch.float32}
    assert weights["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.bfloat16
    initial = load_state_dict(initial_weights)
    control_keys = [key for key in initial if key.startswith("control_model.")]
    changed = [key for key in control_keys if not torch.equal(weights[key], initial[key])]
    assert changed and all(torch.isfinite(weights[key]).all() for key in changed)
    model = create_model(TINY_CONFIG)
    load_weights(model, weights, source="last.ckpt")  # strict, whatever the stored dtypes


def test_float32_matmul_precision_flag_sets_torch_and_defaults_to_true_float32(initial_weights, data20, tmp_path):
    def argv(root: str, *extra: str) -> list[str]:
        return _args(initial_weights, data20, tmp_path / root, "--max_steps", "1", "--logger_freq", "1000", *extra)

    try:
        assert tutorial_train.main(argv("medium", "--float32_matmul_precision", "medium")) == 0
        assert torch.get_float32_matmul_precision() == "medium"
        assert tutorial_train.main(argv("default")) == 0
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.slow
def test_overfitting_one_batch_trains_only_the_control_branch(initial_weights):
    model = create_model(TINY_CONFIG)
    load_weights(model, load_state_dict(initial_weights), source=str(initial_weights))
    model.learning_rate = 1e-3
    generator = torch.Generator().manual_seed(0)
    batch = {"jpg": torch.rand(2, 64, 64, 3, generator=generator) * 2 - 1,
             "hint": torch.rand(2, 64, 64, 3, generator=generator), "txt": ["red circle", "blue circle"]}
    x, cond = model.get_input(batch, model.first_stage_key)
    t = torch.tensor([100, 600])
    noise = torch.randn(x.shape, generator=generator)
    unet_before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    optimizer = model.configure_optimizers()
    model.train()
    losses = []
    for _ in range(30):
        loss, _ = model.p_losses(x, cond, t, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for key, value in model.model.diffusion_model.state_dict().items():
        assert torch.equal(value, unet_before[key]), f"locked UNet weight {key} changed"

    model.sd_locked = False
    optimizer = model.configure_optimizers()
    loss, _ = model.p_losses(x, cond, t, noise=noise)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.model.diffusion_model.state_dict().items() if not torch.equal(v, unet_before[k])}
    assert changed and all(k.startswith(("output_blocks.", "out.")) for k in changed), sorted(changed)[:5]


def _bad_input_cases(initial: Path, data: Path, root: Path) -> list[tuple[list[str], str]]:
    no_prompt = data.parent / "no_prompt"
    no_prompt.mkdir(exist_ok=True)
    base = _args(initial, data, root, "--max_steps", "1")
    return [
        (base + ["--config", str(root.parent / "missing.yaml")], "--config"),
        (base + ["--resume_path", str(root.parent / "missing.ckpt")], "--resume_path"),
        (base + ["--data_root", str(no_prompt)], "prompt.json"),
        (base + ["--resume_from_checkpoint", str(root.parent / "nothing.ckpt")], "--resume_from_checkpoint"),
        (base + ["--resume_from_checkpoint", "last"], "--resume_from_checkpoint"),
        (base + ["--batch_size", "64"], "--batch_size 64"),
        (base + ["--precision", "fp8"], "--precision"),
        (base + ["--strategy", "horovod"], "--strategy"),
        (base + ["--accelerator", "tpu"], "--accelerator"),
        (base + ["--resolution", "100"], "--resolution"),
        (base + ["--frozen_dtype", "bfloat16"], "--frozen_dtype bfloat16 needs --precision"),
        (base + ["--batch_size", "max"], "--batch_size max measures a GPU's memory"),
    ]


def test_bad_inputs_give_one_clear_sentence_and_write_nothing(initial_weights, data20, tmp_path, capsys):
    root = tmp_path / "run"
    for argv, expected in _bad_input_cases(initial_weights, data20, root):
        assert run(tutorial_train.main, argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "Traceback" not in err, (argv, err)
        assert not root.exists(), f"{argv} wrote {list(root.rglob('*'))}"


def _run_script(script: str, argv: list[str], env_path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": env_path}
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *argv], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    """One step of 2 gloo ranks x batch 1 == one process x batch 2, with per-sample noise and timesteps.

    The model is the tiny one at 64 channels: with 32 channels every GroupNorm(32) group is one channel,
    which makes some gradients analytically zero, and Adam's first step turns their rounding noise into
    +-lr updates that no two reduction orders share.
    """
    data = _make_data(tmp_path / "fill2", 2)
    config = OmegaConf.load(TINY_CONFIG)
    for network in ("control_stage_config", "unet_config"):
        config.model.params[network].params.model_channels = 64
    OmegaConf.save(config, tmp_path / "tiny64.yaml")
    initial_weights = make_initial_weights(tmp_path / "init.ckpt", str(tmp_path / "tiny64.yaml"))
    config.model.target = "seeded_controlldm.PerSampleNoiseControlLDM"
    config_path = tmp_path / "seeded_tiny64.yaml"
    OmegaConf.save(config, config_path)
    env_path = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests" / "helpers")])
    common = ["--config", str(config_path), "--resume_path", str(initial_weights), "--data_root", str(data),
              "--accelerator", "cpu", "--max_steps", "1", "--log_max_images", "0", "--learning_rate", "1e-4",
              "--seed", "5"]

    ddp = _run_script("tutorial_train_dist.py", common + ["--devices", "2", "--strategy", "ddp", "--batch_size", "1",
                                                          "--default_root_dir", str(tmp_path / "ddp")], env_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # Rank 1 skipped the run lock that rank 0 held (and removed), and wrote no logs of its own.
    assert sorted(os.listdir(tmp_path / "ddp")) == ["checkpoints", "lightning_logs"]
    assert os.listdir(tmp_path / "ddp" / "lightning_logs") == ["version_0"]
    single = _run_script("tutorial_train.py", common + ["--devices", "1", "--batch_size", "2",
                                                        "--default_root_dir", str(tmp_path / "single")], env_path)
    assert single.returncode == 0, single.stderr[-3000:]

    initial = _control_weights(initial_weights)
    ddp_weights = _control_weights(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    single_weights = _control_weights(tmp_path / "single" / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(ddp_weights[k], initial[k]) for k in initial)  # the step really happened
    worst = max(float((ddp_weights[k] - single_weights[k]).abs().max()) for k in initial)
    assert worst <= 1e-6, f"DDP vs single process: max weight difference {worst:.3g}"


def test_dataloader_workers_default_to_none_on_cpu_and_some_per_gpu(monkeypatch):
    from cldm.training.arguments import MAX_GPU_WORKERS
    from cldm.training.job import default_num_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_num_workers(on_gpu=False, devices=1) == 0
    assert default_num_workers(on_gpu=True, devices=1) == MAX_GPU_WORKERS
    assert default_num_workers(on_gpu=True, devices=8) == 1  # 2 cores per GPU: one for the training process
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert default_num_workers(on_gpu=True, devices=1) == 1


def test_freed_host_memory_is_retained_by_default_on_cpu_only(monkeypatch):
    from cldm.training.arguments import SINGLE_DEVICE_DEFAULTS, build_parser, retains_host_memory

    parse = build_parser(SINGLE_DEVICE_DEFAULTS, "train").parse_args
    assert retains_host_memory(parse(["--accelerator", "cpu"]))
    assert not retains_host_memory(parse(["--accelerator", "cpu", "--no-retain_host_memory"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not retains_host_memory(parse(["--accelerator", "auto"]))  # GPUs: CUDA's caching allocator does it
    assert retains_host_memory(parse(["--accelerator", "gpu", "--retain_host_memory"]))


def test_asking_for_retained_host_memory_without_glibc_warns_once_and_trains_on(monkeypatch, recwarn):
    import platform

    from cldm.training import SINGLE_DEVICE_DEFAULTS, apply_host_memory_option, build_parser

    parse = build_parser(SINGLE_DEVICE_DEFAULTS, "train").parse_args
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    apply_host_memory_option(parse(["--accelerator", "cpu"]))  # the default: nothing to say
    assert not [w for w in recwarn if "retain_host_memory" in str(w.message)]
    with pytest.warns(UserWarning, match=r"--retain_host_memory needs glibc's malloc"):
        apply_host_memory_option(parse(["--accelerator", "cpu", "--retain_host_memory"]))


def test_all_loggers_share_one_new_version_folder(tmp_path, monkeypatch):
    import importlib.util

    import lightning_fabric.loggers.tensorboard
    from cldm.training.job import build_loggers

    for version in (0, 2):
        (tmp_path / "lightning_logs" / f"version_{version}").mkdir(parents=True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: find_spec("os") if name == "tensorboard"
                        else find_spec(name, *args))  # TensorBoard installed, as far as the job can tell
    monkeypatch.setattr(lightning_fabric.loggers.tensorboard, "_TENSORBOARD_AVAILABLE", True)
    csv_logger, tensorboard_logger = build_loggers(str(tmp_path))
    os.makedirs(csv_logger.log_dir)  # the CSV logger writes first (before TensorBoard looks for a free version)
    assert csv_logger.log_dir == tensorboard_logger.log_dir == str(tmp_path / "lightning_logs" / "version_3")
