"""Every option of every config group composes, and bad configs fail early with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ldm.config import ConfigError, check_constructor_keys
from ldm.train import check_config

CONF = Path(__file__).resolve().parents[1] / "conf"
# Groups whose options are whole-run presets rather than one axis; they have their own smoke tests.
PRESET_GROUPS = {"experiment", "debug", "hydra"}


def group_options() -> list[tuple[str, str]]:
    out = []
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        if len(rel.parts) < 2 or rel.parts[0] in PRESET_GROUPS:
            continue
        out.append(("/".join(rel.parts[:-1]), path.stem))
    return out


def test_every_group_has_options():
    groups = {g for g, _ in group_options()}
    for required in ("stage", "model/vae", "model/ldm", "data", "cond", "schedule", "objective",
                     "sampler", "optim", "trainer", "logger", "callbacks", "paths", "first_stage"):
        assert required in groups, f"config group {required} has no options"


@pytest.mark.parametrize(("group", "option"), group_options())
def test_option_composes_and_matches_its_constructors(compose_cfg, tmp_path, group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "folder":
        overrides.append(f"data.root={tmp_path}")
    if group == "source":  # ldm-prepare's group: composed with conf/prepare.yaml
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("prepare", overrides=[*overrides, f"output={tmp_path}", f"paths.output_dir={tmp_path}"])
        OmegaConf.resolve(cfg)
        check_constructor_keys(cfg.source, group)
        return
    cfg = compose_cfg(overrides, tmp_path)
    node = OmegaConf.select(cfg, group.replace("/", "."))
    assert node is not None
    # Resolving catches broken interpolations; the key check catches keys no constructor takes.
    OmegaConf.resolve(cfg)
    check_constructor_keys(node, group)
    check_config(cfg)


def test_misspelt_key_in_a_config_names_the_closest_valid_key(compose_cfg, tmp_path):
    cfg = compose_cfg(["+data.batch_sise=3"], tmp_path)
    with pytest.raises(ConfigError, match="batch_sise.*Did you mean 'batch_size'"):
        check_config(cfg)


@pytest.mark.parametrize(("override", "message"), [
    ("data.batch_size=abc", r"data.batch_size='abc' \(str\) does not fit: .*MNIST5kDataModule takes batch_size as int$"),
    ("data.batch_size=8.5", r"data.batch_size=8.5 \(float\) does not fit"),
    ("data.random_flip=3", r"data.random_flip=3 \(int\) does not fit: .* takes random_flip as bool"),
    ("stage.module.ema.decay=abc", r"stage.module.ema.decay='abc' \(str\) does not fit: .*EMAConfig takes decay as float"),
    ("+trainer.limit_val_batches=abc", r"trainer.limit_val_batches='abc' \(str\) does not fit: .* as int or float"),
])
def test_a_value_of_the_wrong_type_names_its_key(compose_cfg, tmp_path, override, message):
    """An override is typed by its spelling: `batch_size=abc` used to reach the DataLoader as a str (TypeError)."""
    with pytest.raises(ConfigError, match=message):
        check_config(compose_cfg(["stage=ldm", override], tmp_path))


def test_values_of_the_annotated_types_pass_the_type_check(compose_cfg, tmp_path):
    # an int where a float is annotated, null where the constructor decides, a float limit_val_batches
    check_config(compose_cfg(["stage=ldm", "stage.module.ema.decay=1", "first_stage.path=null",
                              "+trainer.limit_val_batches=0.5"], tmp_path))


def test_misspelt_override_is_refused_by_hydra(compose_cfg, tmp_path):
    with pytest.raises(ConfigCompositionException, match="max_step"):
        compose_cfg(["trainer.max_step=3"], tmp_path)


def test_unknown_group_option_lists_the_available_ones(compose_cfg, tmp_path):
    with pytest.raises(ConfigCompositionException, match="kl_f4"):
        compose_cfg(["model/vae=kl_f5"], tmp_path)


def test_wrong_stage_name_fails(compose_cfg, tmp_path):
    cfg = compose_cfg(["stage.name=gan"], tmp_path)
    with pytest.raises(ConfigError, match="stage.name must be one of"):
        check_config(cfg)


def test_the_console_entry_point_finds_its_configs(tmp_path):
    """`ldm-train` as users run it: Hydra's own main, conf/ found from the installed package."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "ldm.train", "--cfg", "job", "--resolve", "stage=ldm", "cond=text",
         f"paths.root_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "FrozenTextEncoder" in result.stdout and "name: ldm" in result.stdout


@pytest.mark.parametrize(("module", "args", "message"), [
    ("ldm.sample", ["model_path=/nonexistent/export"], "ldm-sample: error: export folder /nonexistent/export does not exist"),
    ("ldm.evaluate", ["samples=/nonexistent.npz"], "ldm-evaluate: error:"),
])
def test_clis_turn_bad_input_into_one_line(tmp_path, module, args, message):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", module, *args, f"paths.root_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "HYDRA_FULL_ERROR": "0"})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def _pickled_checkpoint(folder: Path) -> Path:
    """A .ckpt as older Lightning wrote them: hyperparameters pickled as an argparse.Namespace, which a
    weights-only load refuses (UnpicklingError, not a ValueError)."""
    import argparse

    import torch

    path = folder / "run" / "checkpoints" / "pickled.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"unet.w": torch.zeros(1)}, "hparams": argparse.Namespace(lr=1.0)}, path)
    return path


def _corrupt_image_folder(folder: Path) -> Path:
    (folder / "images").mkdir()
    (folder / "images" / "0.png").write_bytes(b"not a png")
    return folder / "images"


@pytest.mark.parametrize(("module", "key", "make", "message"), [
    ("ldm.sample", "model_path", _pickled_checkpoint, "ldm-sample: error: {path} is not a readable checkpoint (UnpicklingError"),
    ("ldm.evaluate", "model_path", _pickled_checkpoint, "ldm-evaluate: error: {path} is not a readable checkpoint (UnpicklingError"),
    ("ldm.evaluate", "samples", _corrupt_image_folder, "ldm-evaluate: error: cannot identify image file"),
], ids=["sample-pickled-ckpt", "evaluate-pickled-ckpt", "evaluate-corrupt-image"])
def test_clis_turn_unreadable_files_into_one_line(tmp_path, module, key, make, message):
    """Errors that are not ValueErrors (pickle's, PIL's) used to escape as Hydra's short traceback."""
    import os
    import subprocess
    import sys

    path = make(tmp_path)
    result = subprocess.run([sys.executable, "-W", "ignore", "-m", module, f"{key}={path}", f"out_dir={tmp_path / 'out'}",
                             f"paths.root_dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message.format(path=path)), result.stderr
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR=1 for a complete" not in result.stderr


def test_the_default_recipe_is_the_one_experiments_recipe_chose(compose_cfg, tmp_path):
    """make train's composition: LDM's scaled_linear schedule, DPM-Solver++(2M) at 20 steps, lr 1e-3, 1000 stage-2
    steps (experiments/recipe/README.md has the measurements behind each), guidance only for t <= 400 at 3.5
    (experiments/guidance_methods/README.md)."""
    cfg = compose_cfg(["stage=ldm"], tmp_path)
    assert cfg.schedule.kind == "scaled_linear"
    assert (cfg.sampler.name, cfg.sampler.steps) == ("dpmpp_2m", 20)
    assert cfg.stage.final_samples.guidance_scale == 3.5 and list(cfg.stage.module.preview.guidance_scales) == [1.0, 3.5]
    assert (cfg.guidance.method, cfg.guidance.interval.low, cfg.guidance.interval.high) == ("cfg", 0.0, 400.0)
    assert cfg.model.ldm.lr == 1e-3 and cfg.stage.max_steps == 1000
    assert cfg.objective.prediction == "eps"
