"""Config plumbing shared by the Hydra entry points: resolvers and clear start-up errors."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import sys
import types
import typing
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ldm.errors import ConfigError  # noqa: F401  (re-exported: ldm.config.ConfigError is public)


def _embedded_minilm() -> str:
    from ldm.nets.conditioners import embedded_minilm_path

    return embedded_minilm_path()


def _export_latent_channels(path: Any, default: Any = 4) -> int:
    from ldm.io.export import export_latent_channels

    return export_latent_channels(None if path is None else str(path), int(default))


def sweep_tags(tags: Any = ()) -> list[str]:
    """The configured tags plus, in a Hydra multirun job, that job's overrides (``objective=v``,
    ``seed=1``): runs of one sweep then filter and group by the swept values in the wandb UI."""
    out = [str(t) for t in (tags or [])]
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            # wandb caps a tag at 64 characters; a long path override is cut, not refused.
            out += [str(o).lstrip("+~")[:64] for o in HydraConfig.get().overrides.task]
    except ImportError:
        pass
    return list(dict.fromkeys(out))


def sweep_group(group: Any = None) -> str | None:
    """``group`` if set; in a Hydra multirun job, else, the sweep's name (its folder's: run_name or the start
    time), so every job of one sweep lands in one wandb group."""
    if group not in (None, ""):
        return str(group)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(str(HydraConfig.get().sweep.dir)).name
    return None


def flat_numbers(results: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a results dict: what ``results.json`` holds for ldm-report."""
    return {k: float(v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_name(name: Any = None) -> str:
    """The run folder's name: ``run_name`` if set; else one that every rank of a cluster job computes alike
    (each rank composes its config itself, so a timestamp would scatter them over several folders) and that
    a requeued job finds again: ``slurm-<job id>`` under SLURM, ``torchrun-<rdzv id>`` under torchrun with
    ``--rdzv-id``; else the start time."""
    if name not in (None, ""):
        return str(name)
    return launcher_run_name() or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def launcher_run_name() -> str | None:
    """The run name the launcher makes stable across ranks and requeues (SLURM job, torchrun --rdzv-id), or None."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"slurm-{array_job}_{task}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if rdzv not in ("", "none"):
        return f"torchrun-{rdzv}"
    return None


def project_root() -> str:
    """Where outputs/, multirun/ and .cache/ldm go unless $LDM_ROOT says: the checkout this ldm runs from when
    the current directory is inside it (a command started in experiments/guidance still writes to the
    checkout's outputs/, as lightning-hydra-template's project root does), else the current directory."""
    checkout = Path(__file__).resolve().parents[1]
    cwd = Path.cwd().resolve()
    inside = (checkout / "pyproject.toml").is_file() and (cwd == checkout or checkout in cwd.parents)
    return str(checkout) if inside else "."


def tasks_per_node(devices: Any) -> int:
    """SLURM tasks per node for one process per device: ``trainer.devices``, which must be a count here
    (-1 or "auto" mean "every visible GPU", which the submitting machine cannot know)."""
    try:
        count = int(devices)
    except (TypeError, ValueError):
        count = -1
    if count < 1:
        raise ConfigError(
            f"hydra/launcher=slurm starts one task per device but trainer.devices={devices}: set "
            "trainer.devices=<GPUs per node> (e.g. trainer.devices=8)"
        )
    return count


def register_resolvers() -> None:
    """Resolvers the configs use; idempotent so tests and entry points can both call it."""
    resolvers = {
        "ldm.embedded_minilm": _embedded_minilm,
        "ldm.export_latent_channels": _export_latent_channels,
        # e.g. UNet in_channels = latent channels + concat-conditioning channels.
        "ldm.add": lambda *xs: sum(int(x) for x in xs),
        "ldm.run_name": run_name,
        "ldm.project_root": project_root,
        "ldm.tasks_per_node": tasks_per_node,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


def check_constructor_keys(node: Any, where: str = "") -> None:
    """Walk a config and check every ``_target_`` node's keys against its constructor's signature.

    Hydra would only fail at instantiate time, possibly after minutes of data preparation, with a bare
    ``TypeError``. This names the misspelt key, where it is, and the closest valid name.
    """
    if isinstance(node, DictConfig):
        target = node.get("_target_") if "_target_" in node else None
        if target is not None:
            _check_target(node, str(target), where)
        for key in node.keys():
            if OmegaConf.is_missing(node, key):
                continue
            try:
                child = node[key]
            except Exception:  # an interpolation that can't resolve yet is checked at instantiate time
                continue
            check_constructor_keys(child, f"{where}.{key}" if where else str(key))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            check_constructor_keys(child, f"{where}[{i}]")


def _check_target(node: DictConfig, target: str, where: str) -> None:
    try:
        obj = get_object(target)
    except Exception as err:
        raise ConfigError(f"{where or 'config'}: _target_ {target!r} cannot be imported ({err})") from err
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [name for name in params if name != "self"]
    for key in node.keys():
        key = str(key)
        if key.startswith("_") and key.endswith("_"):
            continue
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(valid)}."
            raise ConfigError(f"{where}: {target} has no argument {key!r}.{hint}")
    _check_value_types(node, target, where, fn, params)


_SCALARS = (bool, int, float, str)


def _scalar_types(annotation: Any) -> tuple[type, ...] | None:
    """The scalar types a parameter annotated ``annotation`` accepts (``int | None`` -> (int, NoneType)), or
    None where the annotation is not made of plain scalars (lists, modules, configs): those go unchecked."""
    if annotation in _SCALARS:
        return (annotation,)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return tuple({type(arg) for arg in typing.get_args(annotation)})
    if origin in (typing.Union, types.UnionType):
        accepted: list[type] = []
        for arg in typing.get_args(annotation):
            sub = (type(None),) if arg is type(None) else _scalar_types(arg)
            if sub is None:
                return None
            accepted.extend(sub)
        return tuple(accepted)
    return None


def _fits(value: Any, accepted: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int subclass: `batch_size: true` is a mistake
        return bool in accepted
    if isinstance(value, int):
        return int in accepted or float in accepted
    return isinstance(value, accepted)


def _check_value_types(node: DictConfig, target: str, where: str, fn: Any, params: Any) -> None:
    """A command-line override is typed by its spelling (``data.batch_size=abc`` is a str): check scalar
    values against the constructor's annotations, so the error names the key instead of a TypeError from
    deep inside the DataLoader minutes later."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation naming a type-checking-only import: use whatever is not a string
        hints = {name: p.annotation for name, p in params.items() if not isinstance(p.annotation, str)}
    for key in node.keys():
        key = str(key)
        if key not in hints or OmegaConf.is_missing(node, key):
            continue
        try:
            value = node[key]
        except Exception:  # an interpolation that can't resolve yet is checked at instantiate time
            continue
        # null is left to the constructor: configs use it for "not set yet" (first_stage.path: null).
        if value is None or isinstance(value, (DictConfig, ListConfig)):
            continue
        accepted = _scalar_types(hints[key])
        if accepted is None or _fits(value, accepted):
            continue
        names = " or ".join(t.__name__ for t in accepted if t is not type(None))
        raise ConfigError(f"{where}.{key}={value!r} ({type(value).__name__}) does not fit: {target} takes {key} as {names}")


def instantiate_checked(node: DictConfig, where: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` whose errors say which config node failed and why."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        ours = named_fix(err)
        if ours is not None:  # a constructor's own ConfigError/ExportError already names the fix
            raise ours from err
        raise ConfigError(f"could not build `{where}` from its config: {err}") from err


def named_fix(err: BaseException) -> BaseException | None:
    """The innermost ConfigError or ExportError behind ``err``: raised by a constructor or by a resolver of an
    interpolation, it names the fix, where Hydra's and OmegaConf's wrappers add only their internals
    ("Error in call to target ...", "full_key: ... object_type=dict")."""
    from ldm.errors import ExportError

    found, seen = None, err
    for _ in range(16):
        if seen is None:
            break
        if isinstance(seen, (ConfigError, ExportError)):
            found = seen
        seen = seen.__cause__ or seen.__context__
    return found


@contextlib.contextmanager
def user_errors_as_messages(prog: str, errors: tuple[type[BaseException], ...] = (ValueError,)):
    """Bad input (ValueError and its kin: ConfigError, ExportError...) becomes one line naming the fix and
    exit status 2, instead of a traceback; ``HYDRA_FULL_ERROR=1`` keeps the traceback."""
    try:
        yield
    except errors as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = named_fix(err) or err
        print(f"{prog}: error: {message}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)


# Config keys renamed since; the old spelling still works for a while, with a warning that names the new one.
DEPRECATED_KEYS = {"model.ldm.unet": "model.ldm.backbone"}
# What a backbone factory now takes from the model's conditioning (ldm.nets.backbone.ConditionSpec).
_WIRED_BACKBONE_KEYS = ("in_channels", "out_channels", "context_dim", "num_classes", "adm_in_channels")


def rename_deprecated_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides with deprecated keys respelt (``model.ldm.unet.model_channels=64`` ->
    ``model.ldm.backbone.model_channels=64``), each with a warning."""
    out = []
    for arg in argv:
        prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
        body = arg[len(prefix):]
        for old, new in DEPRECATED_KEYS.items():
            if body == old or body.startswith((old + ".", old + "=")):
                body = new + body[len(old):]
                warnings.warn(f"{old} is deprecated: write {new} ({arg} was read as {prefix + body})",
                              FutureWarning, stacklevel=2)
        out.append(prefix + body)
    return out


def apply_deprecated_keys(cfg: DictConfig) -> DictConfig:
    """A config (e.g. a user's model/ldm yaml, or a study variant overriding a few UNet keys) that still defines
    ``model.ldm.unet``: moved (merged) into ``model.ldm.backbone`` with a warning. A full UNet config of the old style (channels and context wired
    through ``cond.*``) becomes a factory: the model now gives those from its conditioner."""
    node = OmegaConf.select(cfg, "model.ldm")
    if node is None or "unet" not in node:
        return cfg
    warnings.warn("model.ldm.unet is deprecated: name the denoiser model.ldm.backbone (see conf/model/ldm/*.yaml)",
                  FutureWarning, stacklevel=2)
    with open_dict(cfg):
        backbone = node.pop("unet")
        for key in _WIRED_BACKBONE_KEYS:
            backbone.pop(key, None)
        if isinstance(backbone.get("transformer"), DictConfig):
            backbone.transformer.pop("context_dim", None)
        if "backbone" in node:  # a partial override (a study's variant) of today's backbone: merged into it
            node["backbone"] = OmegaConf.merge(node.backbone, backbone)
        else:
            backbone["_partial_"] = True
            node["backbone"] = backbone
    return cfg
