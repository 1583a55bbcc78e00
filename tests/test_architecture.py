"""Data flows one way: config -> model + prefixes + tuners -> stage plan -> engine -> batches -> loss. Every
ptscale module belongs to a declared layer and imports only from its own layer or lower ones, counting imports
inside functions (they hide circles); and no two modules import each other, directly or around a circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ptscale"

# Most specific prefix first. A module not matched here fails the test: a new module declares its floor.
LAYERS: tuple[tuple[str, int], ...] = (
    # 0: foundation (names, files, pure maths; nothing of ptscale above it)
    ("ptscale.errors", 0), ("ptscale.version", 0), ("ptscale.plans", 0), ("ptscale.checkpoint", 0), ("ptscale.dist", 0),
    ("ptscale.models.groups", 0), ("ptscale.models.presets", 0), ("ptscale.models.tokenizer", 0),
    ("ptscale.data.synthetic", 0), ("ptscale.data.collate", 0), ("ptscale.data.blip_collate", 0),
    ("ptscale.data.vinvl_collate", 0), ("ptscale.data.ofa_collate", 0), ("ptscale.data.region_features", 0),
    ("ptscale.data.bad_data", 0), ("ptscale.data.images", 0), ("ptscale.eval.captioning", 0), ("ptscale.eval.vqa", 0),
    ("ptscale.data.text_collate", 0), ("ptscale.models.families", 0), ("ptscale.data.synthetic_text", 0),
    ("ptscale.analysis.effective_rank", 0), ("ptscale.prefix.encoder", 0), ("ptscale.prefix.plus", 0),
    ("ptscale.prefix.attention", 0), ("ptscale.training.logger", 0), ("ptscale.tuners.adapter.layer", 0),
    ("ptscale.recipes", 0), ("ptscale.console", 0), ("ptscale.models.memory", 0),
    # 1: the recipe and its per-component sections (torch-free)
    ("ptscale.config", 1), ("ptscale.prefix.config", 1), ("ptscale.tuners.lora.config", 1),
    ("ptscale.tuners.adapter.config", 1), ("ptscale.labels", 1),
    # 2: components a recipe configures: data, prefixes, tuners, generation
    ("ptscale.data", 2), ("ptscale.prefix", 2), ("ptscale.tuners.lora", 2), ("ptscale.tuners.adapter", 2),
    ("ptscale.models.ofa", 2),
    ("ptscale.models.feature_cache", 2), ("ptscale.models.pretrain", 2), ("ptscale.models.pretrain_loop", 2),
    ("ptscale.eval.generate", 2),
    ("ptscale.models.pretrain_text", 2),
    ("ptscale.eval.text", 2),
    # 3: the model a recipe describes (backbone + prefixes + tuners) and its exports
    ("ptscale.models", 3), ("ptscale.tuners", 3),
    # 4: distributed engine, run directories
    ("ptscale.training.engine", 4), ("ptscale.training.sharded", 4), ("ptscale.training.memory_plan", 4),
    ("ptscale.rundir", 4), ("ptscale.runs", 4),
    # 5: workflows: training, evaluation, analysis, reports, loading exports
    ("ptscale.training", 5), ("ptscale.eval", 5), ("ptscale.analysis", 5), ("ptscale.report", 5),
    ("ptscale.hub", 5), ("ptscale.tools", 5), ("ptscale.grid", 5),
    # 6: entry points and the package's public API
    ("ptscale.cli", 6), ("ptscale.export_cli", 6), ("ptscale.listing", 6), ("ptscale.docs", 6), ("ptscale", 6),
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _layer(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or (prefix != "ptscale" and module.startswith(prefix + ".")):
            return layer
    raise AssertionError(f"{module} has no declared layer in tests/test_architecture.py")


def _ours(module: str) -> bool:
    return module == "ptscale" or module.startswith("ptscale.")  # not ptscale_kernels: its own package


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """ptscale modules imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _ours(node.module or ""):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_import_goes_to_the_same_or_a_lower_layer():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in _graph().items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The rule would be worthless if function-level imports slipped past it."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ptscale.cli import main\n    import ptscale.config\n")
    assert _imports(probe, _modules()) == {"ptscale.cli", "ptscale.config"}
