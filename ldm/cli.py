"""What every Hydra entry point does before Hydra runs: the command line is composed once as Hydra would, and
a misspelt key or an unknown option becomes one ``<prog>: error: ...`` line naming the closest valid spelling
(exit status 2, as for every other config error); ``--help`` is a short list of the config groups.

Hydra's own messages give the wrong fix for the commonest slip (``trainer.max_step=3``: "To append to your
config use +trainer.max_step=3"), list every option instead of the nearest, and exit with status 1.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import DictConfig

# Hydra's groups a user picks from; the rest of hydra/* is Hydra's plumbing.
USER_HYDRA_GROUPS = ("hydra/launcher",)
# Every config error exits with this status, as argparse's do (and ldm.config.user_errors_as_messages).
CONFIG_ERROR_EXIT = 2


class OverrideError(ValueError):
    """A command-line override that cannot compose, with the message that names the fix."""


def _hydra(conf_dir: str, config_dir: str | None) -> Any:
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    search_path = create_automatic_config_search_path(None, None, conf_dir)
    if config_dir is not None:  # as hydra.main adds --config-dir
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(config_dir)}",
                            anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name="ldm", config_search_path=search_path)


def _first_values(overrides: Sequence[Any]) -> list[str]:
    """The overrides as one job of the sweep would see them (each swept key at its first value)."""
    out = []
    for o in overrides:
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            if not values:
                continue
            out.append(f"{o.get_key_element()}={values[0]}")
        else:
            out.append(o.input_line)
    return out


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _keys(node: Any, prefix: str = "", depth: int = 6) -> Iterable[str]:
    if depth == 0 or not isinstance(node, DictConfig):
        return
    for key in node.keys():
        path = f"{prefix}.{key}" if prefix else str(key)
        yield path
        try:
            child = node._get_node(key)
        except Exception:
            continue
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _keys(child, path, depth - 1)


def _groups(loader: Any, parent: str = "") -> list[str]:
    found = []
    for name in loader.list_groups(parent):
        path = f"{parent}/{name}" if parent else name
        if path == "hydra" or (path.startswith("hydra/") and path not in USER_HYDRA_GROUPS):
            continue
        if loader.get_group_options(path):
            found.append(path)
        found.extend(_groups(loader, path))
    return found


def _nearest(word: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(override: Any, cfg: DictConfig, groups: Sequence[str]) -> str:
    """``trainer.max_step=3`` -> "trainer has no key 'max_step'. Did you mean trainer.max_steps=3?"."""
    key = override.key_or_group
    value = override.get_value_element_as_str()
    if "/" in key:  # a group's path (modle/ldm=unet_tiny)
        near = _nearest(key, groups)
        hint = f" Did you mean {near}={value}?" if near else f" Groups: {', '.join(groups)}"
        return f"{key}={value}: there is no config group {key}.{hint}"
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, DictConfig) else None
    if isinstance(node, DictConfig):
        near = _nearest(leaf, [str(k) for k in node.keys()])
        where = f"{parent} has no key {leaf!r}" if parent else f"the config has no top-level key {leaf!r}"
        if near is not None:
            return f"{key}={value}: {where}. Did you mean {parent + '.' if parent else ''}{near}={value}?"
    else:
        where = f"there is no {parent!r} in the config"
    # The key's path is wrong higher up (ldm.sampler=ddim): the nearest full key, or a group with that name.
    near_group = _nearest(key.replace(".", "/"), groups) or (leaf.replace(".", "/") if leaf in groups else None)
    if near_group is not None and (leaf == near_group.split("/")[-1] or key.replace(".", "/") in groups):
        return f"{key}={value}: {where}. Did you mean the config group {near_group}={value}?"
    near = _nearest(key, _keys(cfg)) or _nearest(key, groups)
    if near is not None and near in groups:
        return f"{key}={value}: {where}. Did you mean the config group {near}={value}?"
    if near is not None:
        return f"{key}={value}: {where}. Did you mean {near}={value}?"
    return f"{key}={value}: {where} (to add a new key on purpose, write +{key}={value})"


def _missing_option(err: Any, group_override: Any, loader: Any) -> str:
    group = group_override.key_or_group if group_override is not None else None
    options = list(getattr(err, "options", None) or [])
    missing = str(getattr(err, "missing_cfg_file", "") or "")
    if group is None:  # a file a config's defaults list names
        return " ".join(str(err).split())
    if not options:
        options = loader.get_group_options(group)
    wanted = missing.rsplit("/", 1)[-1] if missing else group_override.get_value_element_as_str()
    return _no_option(group, wanted, options)


def _no_option(group: str, value: str, options: Sequence[str]) -> str:
    near = _nearest(value, options)
    hint = f" Did you mean {group}={near}?" if near else ""
    return f"{group}={value}: no option {value!r} in {group}.{hint} Options: {', '.join(sorted(options))}"


def check_overrides(conf_dir: str, config_name: str, argv: Sequence[str]) -> None:
    """Compose ``argv`` as the entry point would (a sweep: its first job), raising OverrideError with a
    one-line message for a key or option that does not exist. Nothing else is checked here: values are the
    job's to check, with the constructors' signatures in hand. Hydra's global state is cleared afterwards, so
    a caller (hydra.main, a test composing its own config) starts from none."""
    from hydra.core.global_hydra import GlobalHydra

    try:
        _check_overrides(conf_dir, config_name, argv)
    finally:
        GlobalHydra.instance().clear()


def _check_overrides(conf_dir: str, config_name: str, argv: Sequence[str]) -> None:
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from hydra.types import RunMode

    args, _ = get_args_parser().parse_known_args(list(argv))
    # --config-path is relative to the calling script: Hydra resolves it, and reports its own errors there.
    if args.help or args.hydra_help or args.shell_completion or args.info or args.config_path:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as err:
        raise OverrideError(" ".join(str(err).split())) from err
    if not args.multirun:
        swept = next((o for o in parsed if o.is_sweep_override() and not o.is_hydra_override()), None)
        if swept is not None:
            raise OverrideError(f"{swept.input_line} gives several values: that is a sweep, run it with -m "
                                f"(a list value is written {swept.key_or_group}=[a,b])")
    hydra = _hydra(conf_dir, args.config_dir)
    loader = hydra.config_loader
    name = args.config_name or config_name
    groups = _groups(loader)
    for o in parsed:  # every swept option of a group, not only the first job's
        key = o.key_or_group
        if key in groups and not o.is_delete() and o.is_sweep_override():
            options = loader.get_group_options(key)
            for value in o.sweep_string_iterator():
                if value not in options:
                    raise OverrideError(_no_option(key, value, options))
    overrides = _first_values(parsed)
    try:
        hydra.compose_config(name, overrides, run_mode=RunMode.RUN, validate_sweep_overrides=False)
        return
    except MissingConfigException as err:
        missing = str(getattr(err, "missing_cfg_file", "") or "")
        culprit = next((o for o in parsed if missing and missing.startswith(o.key_or_group + "/")), None)
        raise OverrideError(_missing_option(err, culprit, loader)) from err
    except ConfigCompositionException as err:
        match = re.search(r"Could not (?:override|append to config\.?|delete from config\.?)[^']*'([^']+)'", str(err))
        culprit = next((o for o in parsed if match and o.key_or_group == match.group(1)), None)
        if culprit is None:
            raise OverrideError(" ".join(str(err).split())) from err
        # The config without the bad override (and without any other one that fails the same way) holds
        # the keys to suggest from.
        rest = [o for o in overrides if _key(o) != culprit.key_or_group]
        for _ in range(len(rest) + 1):
            try:
                cfg = hydra.compose_config(name, rest, run_mode=RunMode.RUN, validate_sweep_overrides=False)
                break
            except ConfigCompositionException as again:
                bad = re.search(r"Could not override '([^']+)'", str(again))
                if bad is None:
                    raise OverrideError(" ".join(str(err).split())) from err
                rest = [o for o in rest if _key(o) != bad.group(1)]
        else:
            raise OverrideError(" ".join(str(err).split())) from err
        raise OverrideError(_unknown_key(culprit, cfg, groups)) from err
    except Exception as err:  # an interpolation or a YAML error in a config file: still one line
        raise OverrideError(" ".join(str(err).split())) from err


def short_help(prog: str, conf_dir: str, config_name: str, doc: str, argv: Sequence[str]) -> str:
    """The config groups this app composes (its defaults list, default option first) and Hydra's launcher."""
    from hydra._internal.utils import get_args_parser
    from hydra.types import RunMode

    args, _ = get_args_parser().parse_known_args(list(argv))
    hydra = _hydra(conf_dir, args.config_dir)
    cfg = hydra.compose_config(args.config_name or config_name, [], run_mode=RunMode.RUN)
    choices = dict(cfg.hydra.runtime.choices)
    loader = hydra.config_loader
    wanted = [g for g in choices if not g.startswith("hydra") or g in USER_HYDRA_GROUPS]
    width = max(len(g) for g in wanted) + 2
    lines = [doc.strip(), "", "Config groups (pick one option: group=option; * = default):"]
    for group in sorted(wanted, key=lambda g: (g.startswith("hydra/"), g)):
        options = loader.get_group_options(group)
        chosen = choices.get(group)
        listed = [f"{o}*" if o == chosen else o for o in options]
        lines.append(f"  {group:<{width}}{', '.join(listed) if listed else '-'}"
                     + ("  (default: none)" if chosen is None else ""))
    lines += ["", "Any key of the config can be set too (trainer.max_steps=100); `--cfg job` prints the whole",
              f"config, `--hydra-help` Hydra's own flags, `-m` runs a sweep ({prog} -m seed=0,1)."]
    return "\n".join(lines)


def run_cli(prog: str, conf_dir: str, config_name: str, doc: str, hydra_main: Any,
            argv: Sequence[str] | None = None) -> Any:
    """The entry point: short help, the override check (one line + exit 2), then Hydra."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(short_help(prog, conf_dir, config_name, doc, [a for a in argv if a not in ("--help", "-h")]))
        return None
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        from hydra.core.global_hydra import GlobalHydra

        try:
            check_overrides(conf_dir, config_name, argv)
        except OverrideError as err:
            print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
            sys.exit(CONFIG_ERROR_EXIT)
        finally:
            GlobalHydra.instance().clear()  # hydra.main initialises its own
    return hydra_main()


def sweep_report(sweep_dir: str) -> str:
    """What a finished sweep left: its folder, the jobs that finished or failed, and the next command."""
    from pathlib import Path

    root = Path(sweep_dir)
    jobs = sorted(p.parent.parent for p in root.glob("*/.hydra/overrides.yaml"))
    done = [j for j in jobs if (j / "results.json").is_file()]
    failed = [j for j in jobs if (j / FAILED_MARKER).is_file()]
    counts = f"{len(done)} finished" + (f", {len(failed)} failed ({', '.join(j.name for j in failed)})" if failed else "")
    return (f"sweep: {len(jobs)} jobs in {root} ({counts})\n"
            f"next: ldm-report {root}    # table over the jobs (mean ± std over seeds) and a plot")


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra < 1.2
    _HydraCallback = object  # type: ignore[assignment,misc]


class SweepSummary(_HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): prints :func:`sweep_report` when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(sweep_report(str(config.hydra.sweep.dir)), flush=True)


# Written into a run folder whose run stopped on an error (with the error): it is not a finished run.
FAILED_MARKER = "FAILED"
