"""Settings of dataclass configs: field docs, typed values, and ``KEY=VALUE`` overrides."""

import ast
import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The ``#:`` comment at the end of each field's line in ``cls`` (Sphinx's attribute-comment form)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {token.start[0]: token.string.removeprefix("#:").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT and token.string.startswith("#:")}
    return {field.target.id: comments[field.lineno] for field in ast.parse(source).body[0].body
            if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and field.lineno in comments}


def type_name(kind) -> str:
    """``int``, ``str | None``, ...: how a field's type reads in help."""
    return kind.__name__ if isinstance(kind, type) else str(kind)


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (a value from a file may be huge)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_value(value, kind):
    """``value`` (read from a TOML/YAML file) as field type ``kind``; ``ValueError`` when it does not fit."""
    if isinstance(kind, types.UnionType):
        if value is None and type(None) in typing.get_args(kind):
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if kind is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(kind, type) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError(f"expected {type_name(kind)}, got {shorten(repr(value))}")


def parse_value(text: str, current):
    """Parse ``text`` as the type of ``current`` (bool/int/float/str; JSON for anything else)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str) or current is None:
        return text
    return json.loads(text)


def format_value(value) -> str:
    """The ``VALUE`` text of ``KEY=VALUE`` that :func:`parse_value` reads back as ``value``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value)


def apply_overrides(config, overrides: list[str], what: str):
    """Return a copy of dataclass ``config`` with ``KEY=VALUE`` items applied; errors name the key."""
    names = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"{what} override {item!r} is not KEY=VALUE")
        if key not in names:
            raise ValueError(f"unknown {what} config key {key!r}; valid keys: {', '.join(sorted(names))}")
        try:
            changes[key] = parse_value(text, getattr(config, key))
        except ValueError as err:
            raise ValueError(f"{what} override {key}={text!r}: {err}") from None
    return dataclasses.replace(config, **changes)


def check_values(cls, values: dict, what: str, exclude=()) -> dict:
    """``values`` (from a file) checked against the field types of dataclass ``cls``; errors name the key."""
    kinds = {f.name: f.type for f in dataclasses.fields(cls) if f.name not in exclude}
    checked = {}
    for key, value in values.items():
        if key not in kinds:
            raise ValueError(f"unknown {what} setting {key!r}; valid keys: {', '.join(sorted(kinds))}")
        try:
            checked[key] = check_value(value, kinds[key])
        except ValueError as err:
            raise ValueError(f"{what} setting {key!r}: {err}") from None
    return checked


def describe(config, prefix: str = "", exclude=()) -> list[tuple[str, str, str, str]]:
    """(key, type, value, doc) of each field of dataclass instance ``config``, as ``--set`` takes them."""
    docs = field_docs(type(config))
    rows = []
    for field in dataclasses.fields(config):
        if field.name not in exclude:
            value = getattr(config, field.name)
            shown = repr(value) if value is None or isinstance(value, str) else format_value(value)
            rows.append((prefix + field.name, type_name(field.type), shown, docs.get(field.name, "")))
    return rows
