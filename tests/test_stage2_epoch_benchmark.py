"""benchmarks/stage2_epoch.py --setup sd256 --quick: the realistic cache benchmark (SD's kl-f8 first stage,
text conditioning, folder data) runs end to end and prints its table; no timing is asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_sd256_benchmark_prints_the_table():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "benchmarks/stage2_epoch.py", "--setup", "sd256", "--quick"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "setup sd256 (quick)" in out and "ImageFolderDataModule 64 px" in out and "FrozenTextEncoder" in out
    rows = dict(re.findall(r"^(on the fly|cache \(build\)|cache \(hit\)|shards \(read\))\s+(\d+)\s", out, flags=re.M))
    # 8 images, batch 2 (the shards hold the held-out image too: a last batch of 1)
    assert rows == {"on the fly": "4", "cache (build)": "4", "cache (hit)": "4", "shards (read)": "5"}
    for name in ("cache \\(hit\\)", "shards \\(read\\)"):
        ratio = re.search(name + r" vs on the fly: ([0-9.]+)x \(target >= 2x: (met|not met)\)", out)
        assert ratio and float(ratio.group(1)) > 0
