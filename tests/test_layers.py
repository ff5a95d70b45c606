"""Dependencies point one way (docs/architecture.md): each rule names a layer of `sora_train` and the
layers it must never import; `sora_train` never imports the prep tool."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

# layer -> the layers it must not import. A layer is the first name under sora_train
# (`models`, `data`, ... or a top-level module such as `train`, `cli`).
FORBIDDEN = {
    "models": {"diffusion", "data", "parallel", "checkpoint", "loop", "eval", "planning", "train", "cli"},
    "diffusion": {"data", "parallel", "checkpoint", "loop", "eval", "planning", "train", "cli"},
    "data": {"diffusion", "parallel", "checkpoint", "loop", "eval", "planning", "train", "cli"},
    "parallel": {"data", "checkpoint", "loop", "optim", "eval", "planning", "train", "cli"},
    "checkpoint": {"loop", "planning", "train", "cli"},
    "eval": {"loop", "train", "cli"},
    "loop": {"train", "cli"},
    "planning": {"loop", "train", "cli"},
}
IMPORTED_ONLY_BY = {"train": {"cli"}, "cli": set()}  # the trainer and the command line sit on top


def _imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file `path`, which belongs to `package`.

    Relative imports are resolved against `package`; `from X import name` also yields `X.name`,
    since `name` may be a submodule; `importlib.import_module("...")` with a literal counts too.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{module}" if module else base
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _names_data_prep(module: str) -> bool:
    """Whether a dotted module name goes through `data_prep` (`data_prep.x`, `sora_train.data_prep.x`)."""
    return "data_prep" in module.split(".")


def test_import_scan_resolves_relative_imports(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "import data_prep.cli, os\n"
        "from ..data_prep.synthetic import generate_corpus\n"
        "from .. import data_prep\n"
        "from ..data.synthetic_captions import COLORS\n"
        "importlib.import_module('sora_train.data_prep.encode')\n"
    )
    assert _imported_modules(source, "sora_train.eval") == [
        (1, "data_prep.cli"),
        (1, "os"),
        (2, "sora_train.data_prep.synthetic"),
        (2, "sora_train.data_prep.synthetic.generate_corpus"),
        (3, "sora_train"),
        (3, "sora_train.data_prep"),
        (4, "sora_train.data.synthetic_captions"),
        (4, "sora_train.data.synthetic_captions.COLORS"),
        (5, "sora_train.data_prep.encode"),
    ]
    flagged = {
        line for line, module in _imported_modules(source, "sora_train.eval") if _names_data_prep(module)
    }
    assert flagged == {1, 2, 3, 5}


def _library_imports() -> list[tuple[str, str, str]]:
    """(path:line, importing layer, imported sora_train module) for every import inside sora_train/."""
    found = []
    for path in sorted((REPO / "sora_train").rglob("*.py")):
        relative = path.relative_to(REPO)
        package = ".".join(relative.parent.parts)  # what relative imports start from, __init__.py too
        layer = relative.with_suffix("").parts[1]
        for line, module in _imported_modules(path, package):
            found.append((f"{relative.as_posix()}:{line}", layer, module))
    return found


def _layer(module: str) -> str | None:
    """The sora_train layer a dotted module name is in (None outside sora_train)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "sora_train" and len(parts) > 1 else None


def test_library_never_imports_data_prep():
    """DESIGN.md principle 15: data_prep imports sora_train, never the reverse."""
    offenders = {where: module for where, _, module in _library_imports() if _names_data_prep(module)}
    assert not offenders, "sora_train must not import data_prep:\n" + "\n".join(
        f"{where}: imports {module}" for where, module in sorted(offenders.items())
    )


def test_layers_import_one_way():
    offenders = {}
    for where, layer, module in _library_imports():
        target = _layer(module)
        if target is None or target == layer:
            continue
        if target in FORBIDDEN.get(layer, ()) or layer not in IMPORTED_ONLY_BY.get(target, {layer}):
            offenders.setdefault(where, f"{layer} imports {module}")
    assert not offenders, "imports against docs/architecture.md:\n" + "\n".join(
        f"{where}: {what}" for where, what in sorted(offenders.items())
    )


def test_the_layer_check_sees_a_backward_import(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("from ..loop.step import forward_backward\nfrom . import dit\n")
    modules = [module for _, module in _imported_modules(source, "sora_train.models")]
    assert {_layer(module) for module in modules} == {"loop", "models"}
    assert "loop" in FORBIDDEN["models"]
