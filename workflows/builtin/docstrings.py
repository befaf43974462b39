"""The textgen corpus: docstrings of standard-library modules, in a fixed order. Standard library only.

Run as a script (`python -I -S docstrings.py MODULE ...`) it prints them as JSON, read in an interpreter that
imported nothing else: the text depends on the Python version alone, not on what a process loaded before.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import warnings
from typing import Any

MIN_DOC_CHARS = 20


def documented(module: Any) -> list[tuple[str, Any]]:
    """(qualified name, object) for the module, its public classes and functions, and their public methods."""
    name = module.__name__
    found: list[tuple[str, Any]] = [(name, module)]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue  # private, or re-exported from another module
        if inspect.isfunction(obj) or inspect.isbuiltin(obj):
            found.append((f"{name}.{attr}", obj))
        elif inspect.isclass(obj):
            found.append((f"{name}.{attr}", obj))
            for m, member in sorted(vars(obj).items()):
                if not m.startswith("_") and callable(getattr(member, "__func__", member)):
                    found.append((f"{name}.{attr}.{m}", getattr(member, "__func__", member)))
    return found


def clean(doc: str) -> str:
    text = "\n".join(line.rstrip() for line in inspect.cleandoc(doc).splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def docstrings(modules: list[str]) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring), each distinct text once (its first owner)."""
    seen: dict[str, str] = {}
    with warnings.catch_warnings():  # touching deprecated aliases (typing.io) warns
        warnings.simplefilter("ignore")
        for mod_name in modules:
            for qualname, obj in documented(importlib.import_module(mod_name)):
                doc = getattr(obj, "__doc__", None)
                if isinstance(doc, str) and len(text := clean(doc)) >= MIN_DOC_CHARS:
                    seen.setdefault(text, qualname)
    return [(q, t) for t, q in seen.items()]


if __name__ == "__main__":
    json.dump(docstrings(sys.argv[1:]), sys.stdout)
