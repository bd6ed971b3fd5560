"""The layering the design guide promises, checked on the source: arrows point down (entry points -> lit -> model
-> nets/diffusion), ldm/model runs without Lightning, and no file grows past 400 lines.

``python tests/test_architecture.py`` prints the cross-package import table (the closing notes quote it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldm"
MAX_LINES = 400

# What each package may import from inside ldm (static imports, function-level ones included).
ALLOWED = {
    "nets": {"errors"},
    "diffusion": {"errors"},
    "model": {"nets", "diffusion", "errors", "distributed"},
    # sample sets are written in parts, one per rank, and joined on rank 0
    "io": {"model", "nets", "diffusion", "errors", "config", "distributed"},
    "metrics": {"model", "nets", "io", "data", "errors", "distributed"},
    # data preparation runs the frozen first stage and text encoder (latent caches, encoded shards)
    "data": {"io", "model", "nets", "errors", "distributed"},
    "losses": {"nets", "errors"},
}
LIGHTNING_FREE = ("model", "nets", "diffusion", "metrics")


def cross_package_imports() -> dict[str, set[str]]:
    """{package or top-level module: the ldm packages/modules it imports (and LIGHTNING for lightning)}."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        source = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if name.split(".")[0] in ("lightning", "pytorch_lightning"):
                    edges[source].add("LIGHTNING")
                elif name.startswith("ldm.") and name.split(".")[1] != source:
                    edges[source].add(name.split(".")[1])
    return edges


def test_packages_import_only_the_layers_below_them():
    edges = cross_package_imports()
    problems = {pkg: sorted(edges[pkg] - allowed - {"LIGHTNING"}) for pkg, allowed in ALLOWED.items()}
    assert not {k: v for k, v in problems.items() if v}, problems
    assert "lit" not in edges["io"] and "lit" not in edges["model"]


def test_the_model_layer_runs_without_lightning():
    edges = cross_package_imports()
    assert not [pkg for pkg in LIGHTNING_FREE if "LIGHTNING" in edges[pkg]]
    # and at run time: importing the model (and building one) loads no Lightning module
    code = ("import sys; import ldm.model, ldm.model.inpainting; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_source_file_passes_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these files: {long}"


if __name__ == "__main__":
    for package, imports in sorted(cross_package_imports().items()):
        print(f"{package:14s} -> {', '.join(sorted(imports))}")
