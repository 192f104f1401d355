"""Reading a YAML config: UTF-8 only, duplicate keys refused, a mapping at the top; every problem named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from core.errors import UserInputError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} appears twice in one section (first at line {seen[key] + 1}); "
                f"YAML would silently keep the last one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


MAX_CONFIG_BYTES = 1_000_000


def read_yaml(path: Path) -> dict[str, Any]:
    """The raw mapping of a config file, or UserInputError saying what is wrong with the file."""
    if path.is_dir():
        raise UserInputError(f"config {str(path)!r} is a folder; pass a YAML file (e.g. {path}/demo.yaml, or "
                             f"write one with `compress init > my.yaml`)")
    if not path.is_file():
        raise UserInputError(f"config file {str(path)!r} does not exist; pass the path of a YAML config "
                             f"(`compress init` writes one; examples are in configs/)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:  # parsing tens of MB of YAML takes minutes before it could say anything
        raise UserInputError(f"config {str(path)!r} is {size / 1e6:,.1f} MB; a config is a few KB of YAML (at most "
                             f"{MAX_CONFIG_BYTES // 1_000_000} MB). Is it the right file? `compress init` writes one")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserInputError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); save it "
                             f"as UTF-8 (configs are YAML text)") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(exc, "problem", exc))
        hint = "" if problem.startswith("the key") else " Check indentation and quoting there."
        raise UserInputError(f"{path}: malformed YAML{where}: {problem}.{hint}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserInputError(f"{path}: the top level must be a mapping of sections (name:, model:, ...), "
                             f"got {type(raw).__name__}")
    return raw
