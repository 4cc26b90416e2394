"""Experiment files: TOML or YAML mappings, the format chosen by the file's extension.

Only flat tables of scalars, strings and lists (and tables of those) are written; ``None`` values are
left out of the files written (TOML has no null), so a missing key means the default.
"""

import json
import tomllib
from pathlib import Path

import yaml

FORMATS = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}
MAX_FILE_BYTES = 1 << 20  # an experiment file is a few hundred bytes; anything near this is not one


def file_format(path) -> str:
    """``"toml"`` or ``"yaml"``, from the extension of ``path``."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown config file extension {suffix!r}; use .toml, .yaml or .yml")
    return FORMATS[suffix]


def read_config_file(path) -> dict:
    """The mapping in TOML/YAML file ``path``; errors name the file."""
    fmt = file_format(path)
    try:
        if Path(path).stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path}: config file of {Path(path).stat().st_size} bytes, more than {MAX_FILE_BYTES}")
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"{path}: cannot read config file: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = tomllib.loads(text) if fmt == "toml" else _load_yaml_without_aliases(path, text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: invalid {fmt.upper()}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (TOML refuses it too)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml_without_aliases(path, text: str):
    """YAML without anchors and aliases (settings never need them, and nested aliases expand exponentially)
    or duplicate keys."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            line = event.start_mark.line + 1
            raise ValueError(f"{path}: line {line}: YAML anchors and aliases (&, *) are not allowed in settings")
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def dump_config(data: dict, fmt: str) -> str:
    """``data`` as ``fmt`` ("toml" or "yaml") text, ``None`` values left out."""
    data = without_none(data)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False)
    return dump_toml(data)


def without_none(data: dict) -> dict:
    return {k: without_none(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None}


def dump_toml(data: dict) -> str:
    """TOML text of a mapping of scalars, strings and lists, with at most one level of tables."""
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = [f"{key} = {toml_value(v)}" for key, v in data.items() if key not in tables]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{key} = {toml_value(v)}" for key, v in table.items())]
    return "\n".join(lines) + "\n"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 0.001, 1e-05, inf, nan: all TOML floats
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) to TOML")
