"""The layers of docs/ARCHITECTURE's layout hold: who may import whom, and no import circles.

Every import of every project module (``launch.py`` and the packages ``deepcoro_jax``,
``input_pipeline``, ``evaluators``, ``configs``, ``benchmarks``) is read with `ast`, at
the top of the module and inside functions alike, and resolved to the project module
it names. The tests themselves are not checked: a test may import what it tests.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("deepcoro_jax", "input_pipeline", "evaluators", "configs", "benchmarks")
SCRIPTS = ("launch.py",)
DOMAIN = "deepcoro_jax.domain"
MODELS = "deepcoro_jax.models"
LOSSES = "deepcoro_jax.losses"
TRAINING = "deepcoro_jax.training"
TRAIN = "deepcoro_jax.training.train"
# Command-line entry points of input_pipeline that may use the shared entry-point helpers.
INPUT_PIPELINE_ENTRY_POINTS = {"input_pipeline.contact_sheet", "input_pipeline.prepare"}
ENTRY_POINT_HELPERS = {"deepcoro_jax.paths", "deepcoro_jax.console"}


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported} ({self.where})"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, pathlib.Path]:
    """Module name -> file of every project module (tests excluded)."""
    files = [ROOT / name for name in SCRIPTS]
    for package in PACKAGES:
        files += [p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts]
    return {_module_name(p): p for p in files}


def _in_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES or name in {n.removesuffix(".py") for n in SCRIPTS}


def _package_of(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[Import]:
    """The project modules that `module` imports anywhere in its file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module, path).split(".")
                anchor = ".".join(package[: len(package) - node.level + 1])
                base = f"{anchor}.{base}".rstrip(".") if base else anchor
            # `from package import module` names a module; `from module import name` does not.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        found += [Import(module, name, where) for name in names if _in_project(name)]
    return found


def all_imports() -> list[Import]:
    modules = project_modules()
    return [i for name, path in sorted(modules.items()) for i in imports_of(name, path, modules)]


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of `graph` with more than one node, or a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _violations(allowed) -> list[str]:
    return [str(i) for i in all_imports() if not allowed(i)]


def test_the_import_reader_sees_imports_at_the_top_and_inside_functions():
    edges = {(i.importer, i.imported) for i in all_imports()}
    assert ("launch", TRAIN) in edges  # inside main()
    assert ("input_pipeline.pipeline", "input_pipeline.ops") in edges  # at the top
    assert len(edges) > 50


def test_find_cycles_finds_a_cycle_and_only_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]


def test_domain_imports_nothing_of_the_project():
    assert _violations(lambda i: not _under(i.importer, DOMAIN) or _under(i.imported, DOMAIN)) == []


def test_models_import_only_models_and_the_domain():
    def allowed(i: Import) -> bool:
        return not _under(i.importer, MODELS) or any(
            _under(i.imported, p) for p in (MODELS, DOMAIN)
        )

    assert _violations(allowed) == []


def test_losses_import_only_the_domain():
    assert _violations(lambda i: i.importer != LOSSES or _under(i.imported, DOMAIN)) == []


def test_evaluators_never_import_the_trainer_or_the_run():
    # Nor anything of training: they get predict functions and an EvalSpec (whose mesh
    # and batch axes place their batches), built by the run.
    def allowed(i: Import) -> bool:
        return not _under(i.importer, "evaluators") or not _under(i.imported, TRAINING)

    assert _violations(allowed) == []


def test_input_pipeline_imports_only_itself_and_the_domain():
    def allowed(i: Import) -> bool:
        if not _under(i.importer, "input_pipeline"):
            return True
        if any(_under(i.imported, p) for p in ("input_pipeline", DOMAIN)):
            return True
        return i.importer in INPUT_PIPELINE_ENTRY_POINTS and i.imported in ENTRY_POINT_HELPERS

    assert _violations(allowed) == []


def test_only_launch_imports_the_training_loop():
    assert _violations(lambda i: i.imported != TRAIN or i.importer == "launch") == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = {name: set() for name in project_modules()}
    for i in all_imports():
        graph[i.importer].add(i.imported)
    assert find_cycles(graph) == []
