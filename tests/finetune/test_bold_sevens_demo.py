"""The fine-tuning demo's data step (experiments/finetune/bold_sevens.py): every seven of the training split,
boldened, under one new caption, and the training digits with their own captions as the prior folder; the
stroke statistic the demo reports tells bold from plain."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "finetune" / "bold_sevens.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("bold_sevens", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_writes_bold_sevens_and_a_prior_folder(tmp_path):
    demo = load_demo()
    demo.main(["data", "--out", str(tmp_path)])
    bold = [json.loads(line) for line in (tmp_path / "bold" / "captions.jsonl").read_text().splitlines()]
    prior = [json.loads(line) for line in (tmp_path / "prior" / "captions.jsonl").read_text().splitlines()]
    assert len(bold) > 300 and {r["caption"] for r in bold} == {demo.PROMPT}
    assert len(prior) > 10 * len(bold) // 2 and demo.PROMPT not in {r["caption"] for r in prior}
    load = lambda folder, rows: np.stack([np.asarray(Image.open(folder / r["file"])) for r in rows[:200]])  # noqa: E731
    thick = demo.stroke_statistics(load(tmp_path / "bold", bold))
    plain = demo.stroke_statistics(load(tmp_path / "prior", prior))
    assert thick["stroke_width_px"] > 1.5 * plain["stroke_width_px"] and thick["ink_fraction"] > plain["ink_fraction"]
