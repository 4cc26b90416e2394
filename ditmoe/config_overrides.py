"""``KEY=VALUE`` overrides of dataclass configs, parsed with the type of the field they replace."""

import dataclasses
import json


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
