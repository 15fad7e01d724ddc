"""The package's shape, read with `ast` (nothing is imported): one-way dependencies and small units.

- No import cycle among gptkit's modules, counting module-level imports and imports inside
  functions alike. The allowed lazy edges are `GPT.from_pretrained` -> gptkit.loading (the model
  never touches files, it forwards to the loader) and `GPT.generate` -> gptkit.generate (nanoGPT's
  method, forwarded to the engine).
- Imports inside functions only of optional dependencies (ALLOWED_LAZY), which must not load unless
  their feature is used.
- No function over 120 lines, no class over 300, no module over 600.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gptkit"

MAX_FUNCTION_LINES, MAX_CLASS_LINES, MAX_MODULE_LINES = 120, 300, 600

# optional dependencies (extras in pyproject.toml), imported where their feature starts
ALLOWED_LAZY = (
    "fastapi", "starlette", "uvicorn", "prometheus_client",  # serve
    "matplotlib",  # plot
    "triton", "gptkit.attention.triton",  # the triton attention backend (the module imports triton at its top)
    "wandb", "tensorboard", "torch.utils.tensorboard",  # metrics loggers
    "transformers",  # bench --compare hf
    "jinja2",  # chat templates (gptkit.chat_template, gptkit.sft): chat, /v1/chat/completions, `prepare chat`
    "gguf",  # GGUF files (llama.cpp's format): read and write
    # FSDP and distributed state dicts: importing them costs ~3 s of start-up (DTensor, sympy),
    # which every run would pay inside its time budget; only fsdp=true runs load them
    "torch.distributed.fsdp", "torch.distributed.checkpoint",
    # a required dependency, but only pretrained names use it; its HTTP stack costs ~0.1 s of start-up
    "huggingface_hub",
)
# (module, function qualname, imported module): the documented lazy edge
ALLOWED_LAZY_EDGES = {("gptkit.model", "GPT.from_pretrained", "gptkit.loading"),
                      # gptkit.load_tokenizer(path) takes anything --model does, as GPT.from_pretrained
                      ("gptkit.tokenizer", "load_tokenizer", "gptkit.loading"),
                      ("gptkit.model", "GPT.generate", "gptkit.generate")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


MODULES = _modules()


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The names an import statement loads: dotted module names (submodules where they exist)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative import
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if sub in MODULES else base)
    return out


def _internal(name: str) -> str | None:
    """The gptkit module `name` refers to (its longest known prefix), or None for other packages."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


class _Imports(ast.NodeVisitor):
    """Module-level imports and (function qualname, import) pairs of one module."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.top: list[str] = []
        self.nested: list[tuple[str, str, int]] = []  # (qualname, imported name, line)
        self.scope: list[str] = []
        self.in_function = 0

    def _record(self, node):
        for t in dict.fromkeys(_targets(node, self.module, self.is_package)):  # once per statement
            if self.in_function:
                self.nested.append((".".join(self.scope), t, node.lineno))
            else:
                self.top.append(t)

    visit_Import = visit_ImportFrom = _record

    def visit_If(self, node: ast.If):
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":  # typing only, never run
            for n in node.orelse:
                self.visit(n)
            return
        self.generic_visit(node)

    def _scoped(self, node, function: bool):
        self.scope.append(node.name)
        self.in_function += function
        self.generic_visit(node)
        self.in_function -= function
        self.scope.pop()

    def visit_FunctionDef(self, node):
        self._scoped(node, True)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._scoped(node, False)


def _imports() -> dict[str, _Imports]:
    out = {}
    for name, (path, tree) in MODULES.items():
        v = _Imports(name, path.name == "__init__.py")
        v.visit(tree)
        out[name] = v
    return out


IMPORTS = _imports()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_the_package():
    """Module-level imports, plus any import of a gptkit module inside a function (a cycle hidden
    in a function is still a cycle), except the documented lazy edge."""
    graph = {m: set() for m in MODULES}
    for m, imp in IMPORTS.items():
        lazy = [t for q, t, _ in imp.nested if (m, q, _internal(t)) not in ALLOWED_LAZY_EDGES]
        for t in imp.top + lazy:
            target = _internal(t)
            if target is not None and target != m:
                graph[m].add(target)
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_function_level_imports_only_of_optional_dependencies():
    offenders = []
    for m, imp in IMPORTS.items():
        for qualname, target, line in imp.nested:
            if (m, qualname, _internal(target)) in ALLOWED_LAZY_EDGES:
                continue
            if any(target == a or target.startswith(a + ".") for a in ALLOWED_LAZY):
                continue
            offenders.append(f"{m}:{line} {qualname} imports {target}")
    assert not offenders, (f"{len(offenders)} function-level imports (hoist them to the module's top; only "
                           f"optional dependencies may load lazily):\n  " + "\n  ".join(offenders))


def _units(kind) -> list[tuple[str, int]]:
    out = []
    for m, (path, tree) in MODULES.items():
        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                name = prefix
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}.{child.name}"
                    if isinstance(child, kind):
                        out.append((f"{m}:{child.lineno} {name[1:]}", child.end_lineno - child.lineno + 1))
                walk(child, name)
        walk(tree, "")
    return out


def test_no_function_over_120_lines():
    big = [f"{n} ({k} lines)" for n, k in _units((ast.FunctionDef, ast.AsyncFunctionDef)) if k > MAX_FUNCTION_LINES]
    assert not big, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(big)


def test_no_class_over_300_lines():
    big = [f"{n} ({k} lines)" for n, k in _units(ast.ClassDef) if k > MAX_CLASS_LINES]
    assert not big, f"classes over {MAX_CLASS_LINES} lines: " + ", ".join(big)


def test_no_module_over_600_lines():
    big = []
    for m, (path, _) in MODULES.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            big.append(f"{m} ({n} lines)")
    assert not big, f"modules over {MAX_MODULE_LINES} lines: " + ", ".join(big)


def test_the_checks_see_a_cycle_and_a_lazy_import():
    """The checks themselves: a two-module cycle is found, and a stray function-level import is seen."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    v = _Imports("gptkit.x", False)
    v.visit(ast.parse("import os\ndef f():\n    import json\nclass C:\n    def g(self):\n        from gptkit import model\n"))
    assert v.top == ["os"]
    assert [(q, t) for q, t, _ in v.nested] == [("f", "json"), ("C.g", "gptkit.model")]
