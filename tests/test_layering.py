"""Imports go down the layers only (ARCHITECTURE.md "Layers", STYLE.md §1).

Bottom to top: foundation (config, weights, processor) < kernels (kelix_fast.triton_kernels,
kelix_fast._C) < ops < models (and presets) < runtime < user-facing (ar, engine, pipeline, cli, the package
root). A module may import its own layer and the layers below it, and no import cycle is allowed. On top of that, triton_kernels/ imports nothing
from kelix_fast but itself, and nothing anywhere imports a top-level `triton_kernels` (it is only
ever installed as kelix_fast.triton_kernels). Every import is checked, also those inside functions
and under `if TYPE_CHECKING:`. A new top-level module of kelix_fast must be given a layer below.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "kelix_fast"
TRITON_PACKAGE = "kelix_fast.triton_kernels"

FOUNDATION, KERNELS, OPS, MODELS, RUNTIME, USER_FACING = range(6)
LAYER_NAMES = ("foundation", "kernels", "ops", "models", "runtime", "user-facing")
# Top-level modules of kelix_fast and their layer; a dotted name takes its longest listed prefix.
LAYERS: dict[str, int] = {
    TRITON_PACKAGE: KERNELS,
    "kelix_fast._C": KERNELS,
    "kelix_fast.ops": OPS,
    "kelix_fast.config": FOUNDATION,
    "kelix_fast.weights": FOUNDATION,
    "kelix_fast.processor": FOUNDATION,
    "kelix_fast.text_tokenizer": FOUNDATION,
    "kelix_fast.image_processing": FOUNDATION,
    "kelix_fast.checkpoint_files": FOUNDATION,
    "kelix_fast.arguments": FOUNDATION,  # checks of scalar arguments, shared by every layer
    "kelix_fast.hub": FOUNDATION,  # huggingface_hub and the stdlib only
    "kelix_fast._native_build": FOUNDATION,  # stdlib only: setup.py loads it before kelix_fast exists
    "kelix_fast.models": MODELS,
    "kelix_fast.runtime": RUNTIME,
    "kelix_fast.ar": USER_FACING,
    "kelix_fast.pipeline": USER_FACING,
    "kelix_fast.engine": USER_FACING,
    "kelix_fast.options": USER_FACING,
    "kelix_fast.serving": USER_FACING,
    "kelix_fast.cli": USER_FACING,
    "kelix_fast.cli_parser": USER_FACING,  # the command line of kelix_fast.cli
    "kelix_fast.presets": MODELS,  # builds models and weights; the engines build on it
    PACKAGE: USER_FACING,  # kelix_fast/__init__.py re-exports the API
}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def top_level_names(package_dir: Path) -> frozenset[str]:
    """Names of the modules and subpackages directly inside a source package folder."""
    names = {path.stem for path in package_dir.glob("*.py") if path.stem != "__init__"}
    names |= {path.name for path in package_dir.iterdir() if (path / "__init__.py").exists()}
    return frozenset(names)


def layer_of(module: str, existing: frozenset[str]) -> int | None:
    """Layer of a dotted kelix_fast name; None for a real module that LAYERS does not list yet.

    `existing` holds the names of kelix_fast's top-level modules; `from kelix_fast import X`
    with an X that is none of them imports an attribute of the package root.
    """
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS and (end > 1 or len(parts) == 1 or parts[1] not in existing):
            return LAYERS[prefix]
    return None


def module_name(path: Path) -> tuple[str, bool]:
    """Dotted name of a source file as installed, and whether it is a package's __init__."""
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "triton_kernels":
        parts = TRITON_PACKAGE.split(".") + parts[1:]
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names an import statement brings in, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level == 0:
        base = node.module or ""
    else:
        package = module if is_package else module.rpartition(".")[0]
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    # `from a.b import c` imports a.b.c when c is a module, else attribute c of a.b; both lie in
    # the layer of the longest prefix of a.b.c that has one.
    return [f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names]


def check_source(
    source: str, module: str, is_package: bool, display_path: str, existing: frozenset[str]
) -> list[Violation]:
    """Every layering violation of one source file."""
    found: list[Violation] = []
    own_layer = layer_of(module, existing)
    tree = ast.parse(source, filename=display_path)
    if own_layer is None:
        top = ".".join(module.split(".")[:2])
        message = f"{top} has no layer: add it to LAYERS in tests/test_layering.py"
        return [Violation(display_path, 1, message)]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        for name in imported_names(node, module, is_package):
            root = name.split(".")[0]
            if root == "triton_kernels":
                message = f"imports top-level {name}; use {TRITON_PACKAGE} (never installed bare)"
                found.append(Violation(display_path, node.lineno, message))
                continue
            if root != PACKAGE:
                continue
            target_layer = layer_of(name, existing)
            if target_layer is None:
                top = ".".join(name.split(".")[:2])
                message = f"imports {name}, but {top} has no layer: add it to LAYERS"
                found.append(Violation(display_path, node.lineno, message))
            elif own_layer == KERNELS and module.startswith(TRITON_PACKAGE):
                if not (name == TRITON_PACKAGE or name.startswith(TRITON_PACKAGE + ".")):
                    message = f"triton_kernels imports {name}: it may import torch and triton only"
                    found.append(Violation(display_path, node.lineno, message))
            elif target_layer > own_layer:
                message = (
                    f"{module} ({LAYER_NAMES[own_layer]}) imports {name} "
                    f"({LAYER_NAMES[target_layer]}): upward import"
                )
                found.append(Violation(display_path, node.lineno, message))
    return found


def source_files() -> list[Path]:
    return sorted((REPO / PACKAGE).rglob("*.py")) + sorted((REPO / "triton_kernels").rglob("*.py"))


def test_no_upward_imports() -> None:
    files = source_files()
    assert any(path.is_relative_to(REPO / PACKAGE) for path in files), "no kelix_fast/*.py found"
    existing = top_level_names(REPO / PACKAGE) | {"triton_kernels", "_C"}
    violations: list[Violation] = []
    for path in files:
        module, is_package = module_name(path)
        display = str(path.relative_to(REPO))
        violations += check_source(path.read_text(), module, is_package, display, existing)
    assert not violations, "layering violations:\n" + "\n".join(map(str, violations))


def import_graph() -> dict[str, set[str]]:
    """kelix_fast module -> the kelix_fast modules it imports (a name that is no module stands for the
    module it comes from; every import counts, those inside functions too)."""
    modules = {module_name(path)[0]: path for path in source_files()}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for name in imported_names(node, module, is_package):
                    while name and name not in modules:
                        name = name.rpartition(".")[0]
                    if name and name != module:
                        edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycles() -> None:
    """Layers forbid upward imports; this also forbids cycles inside a layer (e.g. two user-facing
    modules importing each other, or a module importing the package root that re-exports it), which
    work only while the import order happens to allow them."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    # The cycle this layout removed: the user-facing API and the presets importing each other.
    graph = import_graph()
    graph["kelix_fast.presets"].add("kelix_fast.ar")
    assert find_cycle(graph) is not None


# The checker itself, on small synthetic sources.
EXISTING = frozenset({"ops", "models", "runtime", "config", "ar", "cli", "_C", "triton_kernels"})


@pytest.mark.parametrize(
    ("module", "is_package", "source", "upward"),
    [
        ("kelix_fast.ops.attention", False, "from kelix_fast.models import llm", True),
        ("kelix_fast.ops.attention", False, "from ..runtime import generation", True),
        ("kelix_fast.ops.attention", False, "def f():\n    import kelix_fast.ar", True),
        ("kelix_fast.ops.attention", False, "from kelix_fast import config", False),
        ("kelix_fast.weights", False, "from kelix_fast import ops", True),
        ("kelix_fast.ops.attention", False, "from kelix_fast import BackendUnavailableError", True),
        ("kelix_fast.ops.attention", False, "from . import _checks", False),
        ("kelix_fast.ops", True, "from .attention import attention", False),
        ("kelix_fast.ops.attention", False, "from kelix_fast import _C", False),
        (
            "kelix_fast.ops.attention",
            False,
            "from kelix_fast.triton_kernels import attention",
            False,
        ),
        ("kelix_fast.config", False, "from kelix_fast.models import llm", True),
        (
            "kelix_fast.models.llm",
            False,
            "from kelix_fast import ops\nfrom ..config import C",
            False,
        ),
        ("kelix_fast.models.llm", False, "from kelix_fast.runtime import sampling", True),
        ("kelix_fast.models.llm", False, "from kelix_fast.cli import main", True),
        ("kelix_fast.runtime.sampling", False, "from kelix_fast.models.llm import LLM", False),
        ("kelix_fast.runtime.sampling", False, "from ..ar import KelixAR", True),
        ("kelix_fast.cli", False, "from kelix_fast.ar import KelixAR", False),
        ("kelix_fast", True, "from .ar import KelixAR\nfrom .ops import attention", False),
        ("kelix_fast.triton_kernels.attention", False, "import torch\nimport triton", False),
        ("kelix_fast.triton_kernels.attention", False, "from ._blocks import BLOCK_K", False),
        ("kelix_fast.triton_kernels.attention", False, "from kelix_fast.ops import _checks", True),
        ("kelix_fast.triton_kernels.attention", False, "from kelix_fast.config import C", True),
        ("kelix_fast.ops.attention", False, "import triton_kernels.attention", True),
        ("kelix_fast.ops.attention", False, "from kelix_fast.mystery import thing", True),
        ("kelix_fast.mystery", False, "import torch", True),
    ],
)
def test_checker_flags_exactly_upward_imports(
    module: str, is_package: bool, source: str, upward: bool
) -> None:
    existing = EXISTING | {"mystery"}
    violations = check_source(source, module, is_package, "case.py", existing)
    assert bool(violations) == upward, violations


def test_checker_reports_file_and_line() -> None:
    source = "import torch\n\nfrom kelix_fast.runtime import generation\n"
    violations = check_source(
        source, "kelix_fast.models.llm", False, "kelix_fast/models/llm.py", EXISTING
    )
    assert [str(v).split(": ")[0] for v in violations] == ["kelix_fast/models/llm.py:3"]
