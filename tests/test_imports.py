"""Import discipline, read from the source (ast; nothing is imported).

The package is layered, bottom to top: config, text (leaves) < ops < model < draft < checkpoint <
decode < data < eval = train < simulate < profiling < llm < serve < cli. A module may import its own
top-level package and anything in a lower layer; an import inside a function counts exactly like one
at module level (a lazy import does not make an upward edge acceptable). The few upward edges the
package keeps on purpose are listed in ALLOWED, each with its reason.

Test modules import no other test module: shared code lives in tests/helpers (or tests/compare.py,
tests/strategies.py, conftest).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dspark"
TESTS = ROOT / "tests"

# Every top-level module / subpackage of dspark, with its layer (higher imports lower). Equal layers
# may not import each other (eval and train); config and text are leaves anyone may import. A new
# package must be placed here deliberately: test_every_top_level_module_is_placed fails until it is.
LAYERS = {
    "config": 0,
    "text": 0,
    "ops": 1,
    "model": 2,
    "draft": 3,
    "checkpoint": 4,
    "decode": 5,
    "data": 6,
    "eval": 7,
    "train": 7,
    "simulate": 8,
    "llm": 9,
    "profiling": 10,  # profiles decode rounds of an `LLM`
    "serve": 11,
    "cli": 12,
}
# dspark/__init__.py: `dspark.LLM`, imported lazily in a module __getattr__ (a bare `import dspark`
# loads no torch); the root sits above every layer.
ROOT_LAYER = max(LAYERS.values()) + 1

FACADE = ("DeepseekV4.from_pretrained / DraftModel.from_pretrained: the README's entry points, facades over "
          "dspark.checkpoint")
# (importing module, imported module or package, reason). An entry also covers the imported
# package's submodules. An entry that no longer matches any import fails the test (prune it).
ALLOWED = [
    ("dspark.model.target", "dspark.checkpoint", FACADE),
    ("dspark.draft.deepspec", "dspark.checkpoint", FACADE),
]

# What a test module may import from tests/.
SHARED_TEST_MODULES = ("tests.helpers", "tests.compare", "tests.strategies", "tests.conftest")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str, root: Path) -> bool:
    """Whether `dotted` (e.g. dspark.decode.schedule) names a module or package file under root's parent."""
    base = root.parent.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or base.is_dir()


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth (functions, classes,
    `if TYPE_CHECKING`, try blocks), relative ones resolved, plus importlib.import_module("...") calls
    with a literal name. `from pkg import name` counts as importing pkg.name when that is a module."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            subs = [f"{mod}.{a.name}" for a in node.names if is_module(f"{mod}.{a.name}", root)]
            out += [(node.lineno, m) for m in subs] + ([(node.lineno, mod)] if len(subs) < len(node.names) else [])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node.lineno, node.args[0].value))
    return out


def module_level_lines(path: Path) -> set[int]:
    """Lines of the imports that run when the module is imported (not inside a def or lambda)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    deferred = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                for n in ast.walk(f)}
    return {n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in deferred}


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "assets" not in p.relative_to(PACKAGE).parts)


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return ROOT_LAYER if len(parts) == 1 else LAYERS.get(parts[1])


def test_every_top_level_module_is_placed():
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
           if (p.is_file() and p.suffix == ".py" and p.name != "__init__.py")
           or (p.is_dir() and p.name not in ("assets", "__pycache__") and any(p.rglob("*.py")))}
    unplaced = sorted(top - set(LAYERS))
    assert not unplaced, f"place these in LAYERS (tests/test_imports.py) deliberately: {unplaced}"


def test_package_imports_follow_the_layer_order():
    violations, used = [], set()
    for path in package_files():
        importer = module_name(path, PACKAGE)
        src = layer_of(importer)
        if src is None:  # not placed yet: test_every_top_level_module_is_placed says so
            continue
        for line, imported in imports_of(path, PACKAGE):
            if imported.split(".")[0] != "dspark":
                continue
            dst = layer_of(imported)
            same = importer.split(".")[:2] == imported.split(".")[:2] and len(imported.split(".")) > 1
            if same or (dst is not None and (dst == 0 or dst < src)):
                continue
            allowed = [i for i, (a, b, _) in enumerate(ALLOWED)
                       if a == importer and (imported == b or imported.startswith(b + "."))]
            if allowed:
                used.update(allowed)
                continue
            why = " (not in LAYERS)" if dst is None else ""
            violations.append(f"{path.relative_to(ROOT)}:{line} {importer} -> {imported}{why}")
    stale = [ALLOWED[i][:2] for i in range(len(ALLOWED)) if i not in used]
    report = "\n".join(violations)
    assert not violations, f"{len(violations)} import(s) against the layer order:\n{report}"
    assert not stale, f"ALLOWED entries that match no import any more (remove them): {stale}"


def test_no_function_level_import_dodges_a_cycle():
    """Within a package too (where the layer order says nothing): an import inside a function whose
    module-level form would close an import cycle is a cycle in hiding. ALLOWED entries are exempt."""
    files = {module_name(p, PACKAGE): p for p in package_files()}

    def owner(module: str) -> str:  # the file an imported name lives in: the module or its package
        while module and module not in files:
            module = module.rpartition(".")[0]
        return module

    edges, deferred = {}, []
    for name, path in files.items():
        eager = module_level_lines(path)
        edges[name] = set()
        for line, imported in imports_of(path, PACKAGE):
            target = owner(imported)
            if imported.startswith("dspark.") and target and target != name:
                edges[name].add(target)
                if line not in eager and not any(a == name and (imported == b or imported.startswith(b + "."))
                                                 for a, b, _ in ALLOWED):
                    deferred.append((path, line, name, imported, target))

    def reaches(src: str, dst: str) -> bool:
        seen, todo = set(), [src]
        while todo:
            node = todo.pop()
            if node == dst:
                return True
            if node not in seen:
                seen.add(node)
                todo += edges.get(node, ())
        return False

    hidden = [f"{path.relative_to(ROOT)}:{line} {name} -> {imported}" for path, line, name, imported, target
              in deferred if reaches(target, name)]
    assert not hidden, "function-level imports that close an import cycle:\n" + "\n".join(hidden)


def test_the_root_package_imports_lazily():
    """`import dspark` must not load a layer: dspark/__init__.py imports (llm) only inside functions."""
    init = PACKAGE / "__init__.py"
    eager = [line for line, imported in imports_of(init, PACKAGE)
             if imported.startswith("dspark.") and line in module_level_lines(init)]
    assert not eager, f"dspark/__init__.py imports at module level on lines {eager}"


def test_allowed_entries_give_a_reason():
    for importer, imported, reason in ALLOWED:
        assert importer.startswith("dspark.") and imported.startswith("dspark.") and reason.strip()
        assert layer_of(imported) > layer_of(importer), f"{importer} -> {imported} is not upward: drop it"


def test_no_test_module_imports_another():
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        for line, imported in imports_of(path, TESTS):
            top = imported.split(".")[0]
            if top == "tests":
                ok = any(imported == m or imported.startswith(m + ".") for m in SHARED_TEST_MODULES)
            else:  # a bare `import test_engine` / `import conftest` (rootdir on sys.path)
                ok = not (top.startswith("test_") or top == "conftest")
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not bad, ("test modules import only tests.helpers, tests.compare, tests.strategies, conftest:\n"
                     + "\n".join(bad))
