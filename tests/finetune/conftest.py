"""The tiny SD-shaped model (diffusers folder + CompVis single file) and image folder, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_sd  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd.build(folder)
    tiny_sd.image_folder(folder / "images")
    return folder
