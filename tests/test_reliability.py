"""A run can always continue and nothing is lost: exact resume (both stages), preemption, a full disk during a
checkpoint, determinism, and clear early errors for bad resume/sampling input, all through ldm-train."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

import ldm.io.checkpoint_io as checkpoint_io
import ldm.train as train_cli
from ldm.config import ConfigError
from ldm.io.checkpoint_io import CheckpointError
from ldm.train import check_config, resolve_ckpt_path, train

ROOT = Path(__file__).resolve().parents[1]
# debug=fast: 4 steps, validation (and so last.ckpt) every 2; deterministic kernels for bitwise comparisons.
DET = ["debug=fast", "logger=csv", "data.batch_size=8", "trainer.deterministic=true"]


def ldm_overrides(export: Path) -> list[str]:
    return ["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={export}", "stage.final_samples.enabled=false", *DET]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tree(a, b, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_training_state(straight: Path, resumed: Path) -> None:
    """Weights (EMA included), optimizer moments and step counts, LR schedule, data position and RNG streams."""
    a, b = load(straight), load(resumed)
    for key in ("global_step", "epoch", "state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_tree(a[key], b[key], key)
    assert_same_tree(a["callbacks"]["RNGStateCheckpoint"], b["callbacks"]["RNGStateCheckpoint"], "rng")
    data = [ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] for ckpt in (a, b)]
    assert_same_tree(data[0], data[1], "data position")


def metric_rows(run: Path, name: str = "metrics.csv") -> list[dict[str, str]]:
    with open(run / "csv" / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def vae_straight(tmp_path_factory, compose_cfg):
    """Stage 1, four steps in one go. ckpt_path=last on an empty run folder: nothing to resume, starts fresh."""
    out = tmp_path_factory.mktemp("vae_straight")
    train(compose_cfg(["stage=vae", *DET, "ckpt_path=last"], out))
    return out


@pytest.fixture(scope="module")
def ldm_straight(vae_straight, tmp_path_factory, compose_cfg):
    out = tmp_path_factory.mktemp("ldm_straight")
    train(compose_cfg(ldm_overrides(vae_straight / "export"), out))
    return out


class SignalAtStep(pl.Callback):
    """Sends this process ``signum`` while optimizer step ``step`` runs (a preemption mid-interval)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


def with_extra_callback(monkeypatch, callback: pl.Callback) -> None:
    build = train_cli.build_callbacks
    monkeypatch.setattr(train_cli, "build_callbacks", lambda cfg, out: [*build(cfg, out), callback])


# --- exact resume -----------------------------------------------------------------------------------------
def test_stage1_two_plus_two_steps_with_resume_equal_four_straight(vae_straight, compose_cfg, tmp_path):
    assert load(vae_straight / "checkpoints" / "last.ckpt")["global_step"] == 4  # started fresh from step 0
    overrides = ["stage=vae", *DET]
    train(compose_cfg([*overrides, "trainer.max_steps=2"], tmp_path))  # last.ckpt written at step 2's validation
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    train(compose_cfg([*overrides, "ckpt_path=last"], tmp_path))
    assert_same_training_state(vae_straight / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "last.ckpt")
    # The curve of the first part is kept beside the resumed one, and equals the straight run's.
    before = [r["train/rec_loss"] for r in metric_rows(tmp_path, "metrics.1.csv") if r["train/rec_loss"]]
    straight = [r["train/rec_loss"] for r in metric_rows(vae_straight) if r["train/rec_loss"]]
    assert len(before) == 2 and before == straight[:2]


def test_stage2_preempted_at_step_3_then_resumed_equals_straight(ldm_straight, vae_straight, compose_cfg, tmp_path, monkeypatch):
    """SIGTERM after step 3 (between checkpoints at 2 and 4): the step finishes, last.ckpt is written at step 3,
    and resuming from it reproduces the straight run bit for bit, EMA and optimizer state included."""
    overrides = ldm_overrides(vae_straight / "export")
    with monkeypatch.context() as patch:
        with_extra_callback(patch, SignalAtStep(3, signal.SIGTERM))
        with pytest.raises(SIGTERMException):
            train(compose_cfg(overrides, tmp_path))
    preempted = load(tmp_path / "checkpoints" / "last.ckpt")
    assert preempted["global_step"] == 3
    assert int(preempted["state_dict"]["ema.num_updates"]) == 3
    train(compose_cfg([*overrides, "ckpt_path=last"], tmp_path))
    assert_same_training_state(ldm_straight / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "last.ckpt")


class SignalAfterMicroBatch(pl.Callback):
    """Sends this process ``signum`` once micro-batch ``batch_idx`` is done (mid-step under gradient accumulation)."""

    def __init__(self, batch_idx: int, signum: int) -> None:
        self.batch_idx, self.signum = batch_idx, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), self.signum)


# SIGUSR1 (the SLURM requeue signal) takes the same path after the handler: slow, SIGTERM keeps it in make test
@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_preempted_between_accumulated_micro_batches_then_resumed_equals_straight(vae_straight, compose_cfg, tmp_path,
                                                                                 monkeypatch, signum):
    """accumulate_grad_batches=2, the signal after micro-batch 5 (the first half of step 3): the run finishes step 3
    (its accumulated gradients are in no checkpoint), writes last.ckpt there, and the resumed run equals the straight
    one bit for bit."""
    overrides = [*ldm_overrides(vae_straight / "export"), "trainer.accumulate_grad_batches=2"]
    train(compose_cfg(overrides, tmp_path / "straight"))
    with monkeypatch.context() as patch:
        with_extra_callback(patch, SignalAfterMicroBatch(4, signum))
        with pytest.raises(SIGTERMException):
            train(compose_cfg(overrides, tmp_path / "preempted"))
    preempted = load(tmp_path / "preempted" / "checkpoints" / "last.ckpt")
    assert preempted["global_step"] == 3
    train(compose_cfg([*overrides, "ckpt_path=last"], tmp_path / "preempted"))
    assert_same_training_state(tmp_path / "straight" / "checkpoints" / "last.ckpt",
                               tmp_path / "preempted" / "checkpoints" / "last.ckpt")


def test_same_seed_and_settings_give_the_same_training_curve(ldm_straight, vae_straight, compose_cfg, tmp_path):
    train(compose_cfg(ldm_overrides(vae_straight / "export"), tmp_path))

    def curve(run: Path) -> list[tuple[str, str, str]]:
        return [(r["step"], r["train/loss"], r["val/loss"]) for r in metric_rows(run) if r["train/loss"] or r["val/loss"]]

    straight = curve(ldm_straight)
    assert len(straight) == 6  # 4 training steps, 2 validations
    assert len({loss for _, loss, _ in straight if loss}) == 4  # a real curve, not a constant
    assert curve(tmp_path) == straight


def test_ckpt_path_last_without_a_checkpoint_starts_fresh_and_says_so(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(["ckpt_path=last"], tmp_path)
    with caplog.at_level("WARNING", logger="ldm.train"):
        assert resolve_ckpt_path(cfg, tmp_path) is None
    assert "starting fresh" in caplog.text and str(tmp_path / "checkpoints" / "last.ckpt") in caplog.text


def test_run_name_gives_a_stable_run_folder_to_resume_in():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["stage=ldm", "run_name=exp1"], return_hydra_config=True)
    assert Path(cfg.hydra.run.dir).parts[-3:] == ("outputs", "ldm", "exp1")


def test_requeue_signals_are_noted_for_the_next_step_boundary_and_handlers_restored(monkeypatch, tmp_path):
    from ldm.lit.reliability import ResumeCheckpoint

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    callback = ResumeCheckpoint(str(tmp_path))
    monkeypatch.setenv("SLURM_NTASKS", "1")  # the same under SLURM: Lightning's mid-step SLURM handler is replaced
    callback.on_fit_start(None, None)
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        assert signal.getsignal(signum) == callback._on_signal
    os.kill(os.getpid(), signal.SIGUSR2)
    assert callback._requested == signal.SIGUSR2  # only noted: nothing is written from inside the handler
    assert not any(tmp_path.iterdir())
    callback.teardown(None, None, "fit")
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(ValueError, match="SIGNOPE"):
        ResumeCheckpoint(str(tmp_path), requeue_signals=["SIGNOPE"])


# --- checkpoints under faults -----------------------------------------------------------------------------
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(vae_straight, compose_cfg, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save_then_fill_disk(obj, path):
        # The first last.ckpt (step 2) is written; the disk is full when the next one (step 4) is.
        calls.extend([path] if Path(path).name.startswith(".last.ckpt.") else [])
        if len(calls) < 2:
            return real_save(obj, path)
        with open(path, "wb") as f:  # half a checkpoint, then ENOSPC
            f.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", save_then_fill_disk)
    with pytest.raises(CheckpointError, match="No space left on device; the previous last.ckpt is intact"):
        train(compose_cfg(ldm_overrides(vae_straight / "export"), tmp_path))
    monkeypatch.undo()
    survivor = load(tmp_path / "checkpoints" / "last.ckpt")
    assert survivor["global_step"] == 2 and "state_dict" in survivor
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


# --- non-finite losses in the real stages ---------------------------------------------------------------
def test_stage2_skips_a_nan_step_without_touching_weights_optimizer_or_ema(vae_straight, compose_cfg, tmp_path, monkeypatch):
    from ldm.lit.latent_diffusion import LatentDiffusionModule

    original = LatentDiffusionModule.training_step

    def nan_at_step_1(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 1 else loss

    monkeypatch.setattr(LatentDiffusionModule, "training_step", nan_at_step_1)
    results = train(compose_cfg([*ldm_overrides(vae_straight / "export"), "callbacks.nan_guard.policy=skip"], tmp_path))
    assert results["train/nonfinite_skipped"] == 1
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4 and ckpt["callbacks"]["NonFiniteGuard"]["skipped"] == 1
    assert int(ckpt["state_dict"]["ema.num_updates"]) == 3  # the skipped step did not move the EMA
    steps = {int(state["step"]) for state in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {3}  # nor the optimizer: no moment update, no step count
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_stage1_stops_on_nan_with_the_step_the_terms_and_the_last_good_state(compose_cfg, tmp_path, monkeypatch):
    from ldm.lit.autoencoder import AutoencoderModule
    from ldm.lit.reliability import NonFiniteLossError

    original = AutoencoderModule._reconstruct

    def nan_decoder_at_batch_1(self, images, sample_posterior):
        out = original(self, images, sample_posterior)
        return (out[0] * float("nan"), *out[1:]) if self.training and int(self.batches_trained) == 1 else out

    monkeypatch.setattr(AutoencoderModule, "_reconstruct", nan_decoder_at_batch_1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss and gradient at step 2 \(.*train/rec_loss=nan.*\); "
                                                 r"stopped by callbacks.nan_guard.policy=stop") as err:
        train(compose_cfg(["stage=vae", *DET, "callbacks.nan_guard.policy=stop"], tmp_path))
    ckpt_path = tmp_path / "checkpoints" / "nonfinite-step0000002.ckpt"
    assert str(ckpt_path) in str(err.value)
    ckpt = load(ckpt_path)
    assert int(ckpt["state_dict"]["batches_trained"]) == 2
    assert {int(state["step"]) for state in ckpt["optimizer_states"][0]["state"].values()} == {1}
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# --- bad resume / sampling input: clear errors before training -------------------------------------------
def test_missing_ckpt_path_is_refused(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        train(compose_cfg(["stage=vae", *DET, f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path))


def test_truncated_checkpoint_is_refused_before_any_data_is_built(vae_straight, compose_cfg, tmp_path):
    data = (vae_straight / "checkpoints" / "last.ckpt").read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint.*truncated"):
        train(compose_cfg(["stage=vae", *DET, f"ckpt_path={broken}"], tmp_path / "run"))
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run started


def test_stage1_checkpoint_cannot_resume_stage2(vae_straight, compose_cfg, tmp_path):
    ckpt = vae_straight / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="is a stage=vae checkpoint, but this run is stage=ldm"):
        train(compose_cfg([*ldm_overrides(vae_straight / "export"), f"ckpt_path={ckpt}"], tmp_path))


def test_checkpoint_of_another_model_size_is_refused(ldm_straight, vae_straight, compose_cfg, tmp_path):
    ckpt = ldm_straight / "checkpoints" / "last.ckpt"
    overrides = [*ldm_overrides(vae_straight / "export"), "model.ldm.backbone.model_channels=64", f"ckpt_path={ckpt}"]
    with pytest.raises(CheckpointError, match=r"does not fit this run(.|\n)*shape of ema.model.input_blocks.0.0.bias: checkpoint \(32,\) vs model \(64,\)"):
        train(compose_cfg(overrides, tmp_path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampler.steps=0", r"sampler.steps=0 is out of range: use 1..1000"),
        ("sampler.steps=5000", r"sampler.steps=5000 is out of range"),
        ("stage.final_samples.guidance_scale=-1", r"final_samples.guidance_scale=-1.* must be >= 0"),
        ("stage.module.preview.guidance_scales=[1,-3]", r"guidance_scales\[1\]=-3.* must be >= 0"),
    ],
)
def test_out_of_range_sampling_settings_fail_before_training(compose_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_cfg(["stage=ldm", override], tmp_path))


def test_entry_point_prints_one_line_error_and_keeps_traceback_on_request(tmp_path, monkeypatch, capsys):
    argv = ["ldm-train", "stage=vae", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ldm-train: error: ckpt_path={tmp_path / 'missing.ckpt'} does not exist")
    assert "Traceback" not in err
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="does not exist"):
        train_cli.main()


def test_image_smaller_than_the_crop_is_upscaled_not_padded(tmp_path):
    import numpy as np
    from PIL import Image

    from ldm.data.folder import ImageFolderDataModule

    for i in range(10):  # 12x8 grey images, far smaller than the 32x32 crop
        Image.fromarray(np.full((8, 12), 200, np.uint8), "L").save(tmp_path / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=32, mode="L", batch_size=4, num_workers=0,
                               val_fraction=0.2, random_crop=True, captions=False)
    dm.setup("fit")
    images = next(iter(dm.train_dataloader()))["image"]
    assert images.shape == (4, 1, 32, 32)
    # Upscaled to cover the crop: grey everywhere, no black padding at the borders.
    torch.testing.assert_close(images, torch.full_like(images, 200 / 127.5 - 1))


# --- preemption of a real process ---------------------------------------------------------------------------
def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if process.poll() is not None:
            raise AssertionError(f"ldm-train exited early ({process.returncode}):\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_a_training_process_checkpoints_and_exits_then_resumes(vae_straight, compose_cfg, tmp_path, signum):
    """A real `python -m ldm.train` with a long max_steps: once it has trained a few steps (its first last.ckpt
    appears at step 2), the signal makes it finish its step, write last.ckpt and exit with status 143."""
    run = tmp_path / "run"
    overrides = [*ldm_overrides(vae_straight / "export"), "stage.max_steps=100000", "stage.val_check_interval=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ldm.train", *overrides, f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for(run / "checkpoints" / "last.ckpt", process)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    assert "stopped by a signal at step" in output and "Traceback" not in output
    step = load(run / "checkpoints" / "last.ckpt")["global_step"]
    assert step >= 2
    # The checkpoint resumes: two more steps from where it stopped.
    results = train(compose_cfg([*overrides, f"trainer.max_steps={step + 2}", "ckpt_path=last"], run))
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == step + 2
    assert results["run_dir"] == str(run)


def start_ldm_train(overrides: list[str], run: Path, cache: Path) -> subprocess.Popen:
    """`python -m ldm.train` on one thread, importing this checkout's ldm (cwd and PYTHONPATH)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "ldm.train", *overrides, f"hydra.run.dir={run}",
                             f"paths.cache_dir={cache}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]


@pytest.mark.slow
def test_stage2_killed_with_sigkill_then_resumed_equals_straight(vae_straight, tmp_path):
    """No handler runs on SIGKILL: the run continues from the last checkpoint that reached the disk (last.ckpt,
    written atomically at each validation), and the steps after it are redone. The result must equal a
    straight run bit for bit: weights, EMA, optimizer moments, LR schedule, RNG streams and data position.
    All three runs are subprocesses with the same thread count, so their float reductions agree."""
    overrides = [*ldm_overrides(vae_straight / "export"), "stage.max_steps=8", "stage.val_check_interval=2"]
    straight = start_ldm_train(overrides, tmp_path / "straight", tmp_path / "cache")
    finish(straight)
    run = tmp_path / "killed"
    process = start_ldm_train(overrides, run, tmp_path / "cache")
    wait_for(run / "checkpoints" / "last.ckpt", process)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = load(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 2 <= killed_at < 8, killed_at  # killed part-way, from a checkpoint ldm-train itself wrote
    finish(start_ldm_train([*overrides, "ckpt_path=last"], run, tmp_path / "cache"))
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert_same_training_state(tmp_path / "straight" / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    ema = [load(r / "checkpoints" / "last.ckpt")["state_dict"]["ema.num_updates"] for r in (tmp_path / "straight", run)]
    assert int(ema[0]) == int(ema[1]) == 8
