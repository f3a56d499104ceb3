"""The public surface: what ``import aloader`` loads, and every public module's ``__all__`` against docs/api.md."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
PUBLIC_MODULES = (
    "aloader",
    "aloader.samplers",
    "aloader.stats",
    "aloader.errors",
    "aloader.storage",
    "aloader.datasets",
)
# Loaded on first use, never by ``import aloader``: the bench by the CLI only, matplotlib by plots only, and the
# datasets and storage clients when a dataset or a read needs them.
NOT_IMPORTED = ("aloader.bench", "matplotlib", "aloader.datasets", "aloader.storage")

_HEADING = re.compile(r"^## `(aloader[\w.]*)`\s*$")
_ENTRY = re.compile(r"^- `(\w+)`:")


def documented_names() -> dict[str, list[str]]:
    """The names listed in docs/api.md, per module: ``- `name`: ...`` lines under a ``## `module` `` heading."""
    names: dict[str, list[str]] = {}
    module: str | None = None
    for line in API_DOC.read_text().splitlines():
        if line.startswith("#"):
            heading = _HEADING.match(line)
            module = heading.group(1) if heading else None
            if module is not None:
                names.setdefault(module, [])
        elif module is not None and (entry := _ENTRY.match(line)):
            names[module].append(entry.group(1))
    return names


def test_import_aloader_loads_neither_the_bench_nor_plots_nor_storage() -> None:
    # A fresh interpreter: this test process has imported much more by now.
    code = "import json, sys, aloader; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "aloader" in loaded
    unexpected = [name for name in loaded if any(name == n or name.startswith(f"{n}.") for n in NOT_IMPORTED)]
    assert unexpected == []


def test_docs_list_every_public_module() -> None:
    assert sorted(documented_names()) == sorted(PUBLIC_MODULES)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_is_what_the_docs_list(module_name: str) -> None:
    module = importlib.import_module(module_name)
    documented = documented_names()[module_name]
    assert len(documented) == len(set(documented)), f"a name is listed twice under {module_name}"
    assert len(module.__all__) == len(set(module.__all__)), f"a name is twice in {module_name}.__all__"
    assert set(documented) == set(module.__all__)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_name_in_all_exists(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert [name for name in module.__all__ if not hasattr(module, name)] == []
