"""The README's quoted commands parse and compose: every ``ldm-train`` / ``ldm-sample`` / ``ldm-evaluate`` /
``ldm-prepare`` line of its code blocks goes through the check the console scripts run before Hydra (override
syntax, every key and group option exists), so the text and the configs cannot drift apart."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ldm.cli import check_overrides

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
APPS = {"ldm-train": "train", "ldm.train": "train", "ldm-sample": "sample", "ldm.sample": "sample",
        "ldm-evaluate": "evaluate", "ldm.evaluate": "evaluate", "ldm-prepare": "prepare", "ldm.prepare": "prepare"}


def readme_commands(path: Path = ROOT / "README.md") -> list[tuple[str, list[str]]]:
    """(config name, overrides) of each entry-point command in the README's fenced code blocks; placeholders
    (``<export>``, ``...``) become a plain value, as a user would fill them in."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if not line or line.startswith("#") or not any(app in line for app in APPS):
                continue
            # `...` alone stands for more arguments; `key=...` and `<export>` for a value
            tokens = [t.replace("...", "x") for t in shlex.split(re.sub(r"<[^>]*>", "x", line)) if t != "..."]
            at = next((i for i, t in enumerate(tokens) if t.rsplit("/", 1)[-1].rstrip(")") in APPS), None)
            if at is None:
                continue
            app = APPS[tokens[at].rsplit("/", 1)[-1].rstrip(")")]
            args = tokens[at + 1:]
            commands.append((app, args))
    return commands


COMMANDS = readme_commands()


def test_the_readme_quotes_commands_of_every_entry_point():
    assert len(COMMANDS) >= 25
    assert {app for app, _ in COMMANDS} == {"train", "sample", "evaluate", "prepare"}
    assert any("-m" in args and "ckpt_path=last" in args for app, args in COMMANDS if app == "train")


@pytest.mark.parametrize(("app", "args"), COMMANDS, ids=[f"{a}:{' '.join(x)[:60]}" for a, x in COMMANDS])
def test_a_readme_command_parses_and_composes(app, args):
    check_overrides(CONF_DIR, app, args)
