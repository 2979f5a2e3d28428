"""The package's import rules, read from its source with `ast` (every import statement, at module level or inside a
function): imports run down the layers below, never up or sideways; no module imports another module's private
(`_x`) name; no modules import each other, directly or through others."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import minicpm

PACKAGE = Path(minicpm.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    # Lowest first. Each name is a folder or a module of the package; a module belongs to the longest name that is it
    # or a folder above it. A module may import from a lower layer, and from its own folder in its own layer; never
    # from a higher layer, nor from another folder in its own layer.
    ("errors",),
    ("files",),
    # config dataclasses from YAML; experiment spec files; the run-directory layout; matplotlib figures
    ("typed_config", "specs", "rundir", "plots"),
    ("registry", "model"),
    ("optim",),
    # The weight layouts a checkpoint is written in (official HF, Llama, Mixtral): what checkpoints read.
    ("interop.formats", "interop.official", "interop.hf", "interop.llama", "interop.mixtral", "interop.resolve"),
    ("checkpoints",),
    ("data",),
    ("infer",),
    ("eval",),
    ("interop",),  # the converters (export, gguf, initialise): they read checkpoints, tokenizers and the layouts
    ("train",),
    ("laws", "stages"),
    ("jobs",),
    ("sweep",),
    ("windtunnel", "scaling"),
    ("report",),
    ("reproduce",),  # the paper's findings: parts built on the wind tunnel, scaling and laws
    ("demos",),
    ("cli",),
    ("__main__",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@cache
def tree(module: str) -> ast.Module:
    path = modules()[module]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The dotted module an ImportFrom names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if modules()[module].name != "__init__.py":
        package = package[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


@cache
def imports(module: str) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for each package import anywhere in the module; `from M import
    x` counts as an import of the module M.x when there is one."""
    found = []
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names if alias.name.split(".")[0] == "minicpm"]
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, node)
            if source.split(".")[0] != "minicpm":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((node.lineno, submodule, None) if submodule in modules()
                             else (node.lineno, source, alias.name))
    return found


def edges() -> list[tuple[str, int, str]]:
    return sorted({(module, line, target) for module in modules() for line, target, _ in imports(module)
                   if target != module})


def where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(PACKAGE.parent)}:{line}"


def unit(module: str) -> str:
    """The LAYERS name a module belongs to."""
    dotted = module.removeprefix("minicpm.")
    names = [name for layer in LAYERS for name in layer if dotted == name or dotted.startswith(name + ".")]
    return max(names, key=len) if names else ""


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if unit(module) in names)


def folder(module: str) -> str:
    return unit(module).split(".")[0]


def test_every_module_has_a_place_in_the_layers():
    unplaced = [m for m in modules() if m != "minicpm" and not unit(m)]
    assert not unplaced, f"add to LAYERS: {', '.join(unplaced)}"


def test_imports_run_down_the_layers():
    wrong = []
    for module, line, target in edges():
        if target == "minicpm" or not unit(module) or not unit(target):
            continue
        down = layer(target) < layer(module)
        within = folder(target) == folder(module) and layer(target) == layer(module)
        if not (down or within):
            wrong.append(f"{where(module, line)}: {unit(module)} (layer {layer(module)}) imports {target} "
                         f"({unit(target)}, layer {layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_command_line_but_main():
    wrong = [f"{where(m, line)}: {target}" for m, line, target in edges()
             if folder(target) == "cli" and folder(m) not in ("cli", "__main__")]
    assert not wrong, "\n".join(wrong)


def module_bindings(module: str) -> dict[str, str]:
    """{local name: package module} for names an import binds to a module of the package."""
    bound = {}
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "minicpm":
                    bound[alias.asname or "minicpm"] = alias.name if alias.asname else "minicpm"
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules():
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
    return bound


def dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    """The dotted name an attribute chain reads through a name bound to a package module (`m.a.b`), else None."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute) and (base := dotted(node.value, bound)) is not None:
        return f"{base}.{node.attr}"
    return None


def test_no_module_imports_another_modules_private_name():
    wrong = []
    for module in modules():
        for line, source, name in imports(module):
            private = name if name is not None else source.split(".")[-1]
            if source != module and is_private(private):
                wrong.append(f"{where(module, line)}: {source} {name or ''}".rstrip())
        bound = module_bindings(module)
        for node in ast.walk(tree(module)):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                owner = dotted(node.value, bound)
                if owner in modules() and owner != module:
                    wrong.append(f"{where(module, node.lineno)}: {owner}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for module, _, target in edges():
        if target in graph:
            graph[module].add(target)
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for t in sorted(graph[m]):
            if t not in index:
                visit(t)
                low[m] = min(low[m], low[t])
            elif t in on_stack:
                low[m] = min(low[m], index[t])
        if low[m] == index[m]:
            component = []
            while True:
                t = stack.pop()
                on_stack.discard(t)
                component.append(t)
                if t == m:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    described = [" <-> ".join(c) + ": " + "; ".join(f"{where(m, line)} -> {t}" for m, line, t in edges()
                                                       if m in c and t in c)
                 for c in cycles]
    assert not described, "\n".join(described)
