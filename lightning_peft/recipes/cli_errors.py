"""Command-line errors whose first line is the cause and the fix.

jsonargparse reports a bad ``peft.method`` as a 50-line usage block followed by "Does not validate against
any of the Union subtypes", with the real cause ("Option 'rr' is not accepted", or our own
``ValueError`` for ``r: 0``) buried in the list of what each subtype said; a method's own ``ValueError``
during instantiation arrives as a 75-line traceback. YAML itself keeps the last of two equal keys
without a word (a second ``method:`` silently replaces the first). This module finds the cause, names the
accepted arguments where that is the fix, and checks config files for duplicated keys before parsing.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import yaml

from lightning_peft.methods import METHODS, registered_methods


class ConfigError(ValueError):
    """A configuration the command line cannot use, explained in one message."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{self.name}:{line}: key {key!r} appears twice in one mapping (first on line {seen[key]}); YAML would "
                    f"silently keep only the second. Keep one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def check_config_file(path: str | Path) -> None:
    """Refuse a YAML config with a key repeated in one mapping (naming the file, both lines and the key)."""
    text = Path(path).read_text(encoding="utf-8")
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    finally:
        loader.dispose()


def config_paths(argv: list[str]) -> list[str]:
    """The files given with ``--config``/``-c`` (``--config=FILE`` too) in a command line."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return [p for p in paths if Path(p).is_file()]


def _accepted_arguments(class_path: str) -> list[str] | None:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self" and not p.startswith("*")]


def usable_methods() -> list[str]:
    """Import paths of every concrete PEFT method (what ``peft.method.class_path`` accepts)."""
    found = []
    for cls in registered_methods():
        if not cls.__module__.startswith(("tests", "test_")):
            public = METHODS.get(cls.__name__) is cls  # the package's own methods are public as lightning_peft.<Name>
            found.append(f"lightning_peft.{cls.__name__}" if public else f"{cls.__module__}.{cls.__qualname__}")
    return found


def summarize(error: BaseException) -> str | None:
    """One message with the cause of a jsonargparse parse/validation failure, or None if it is not one."""
    text = str(error)
    if "Does not validate against any of the Union subtypes" not in text and "Problem with given class_path" not in text:
        if type(error).__name__ == "ArgumentError" and type(error).__module__.startswith(("argparse", "jsonargparse")):
            return " ".join(text.split())  # a plain parser error (unknown key, bad type): already one cause
        return None
    key = re.search(r'Parser key "([^"]+)"', text)
    causes = []
    class_path = None
    for item in re.split(r"\n\s*- ", text.split("Errors:", 1)[-1])[1:]:
        item = item.split("\n  Given value", 1)[0].strip()
        if item.startswith(("Expected a <class 'NoneType'>", "Expected a <class 'list'>")):
            continue  # the Optional's other branch, or the list of methods (a composition) for a single method's mapping
        found = re.match(r"Problem with given class_path '([^']+)':\s*(.*)", item, re.S)
        if found:
            class_path, item = found.group(1), found.group(2)
        causes.append(" ".join(item.split()))
    if not causes:
        return None
    message = (f"{key.group(1)}: " if key else "") + "; ".join(causes)
    missing = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", message)
    if missing:
        message = f"{message}: class_path '{missing.group(1)}.{missing.group(2)}' does not exist"
        if key and key.group(1).endswith("method"):
            message += f"; the methods are {', '.join(usable_methods())}"
    unknown = re.search(r"Option '([^']+)' is not accepted|Key '([^']+)' is not expected", message)
    if unknown and class_path:
        accepted = _accepted_arguments(class_path)
        if accepted:
            name = class_path.rsplit(".", 1)[-1]
            message += f". {name} takes: {', '.join(accepted)}"
    return message
