"""One command-line convention for ``python -m ditmoe.train`` and the scripts in tools/.

* Usage errors (a bad or missing flag, a count that is not positive) exit with status 2 through
  ``parser.error``; the message names the option.
* Runtime errors (a missing file, a missing key, a bad value in a file) exit with status 1 and
  ``error: MESSAGE`` on stderr, without a traceback: wrap the work in ``with user_errors():``.
* Every flag has help; renamed flags keep their old spelling as a hidden alias.
"""

import argparse
import sys
from contextlib import contextmanager

# Errors about the user's input or environment. Anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, KeyError, ValueError)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that refuses flags without help and accepts hidden old spellings of flags."""

    def __init__(self, *args, **kwargs):
        self._aliases: dict[str, str] = {}  # old spelling -> documented flag
        self._typed: dict[str, str] = {}  # documented flag -> old spelling used on the command line
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, aliases=(), **kwargs):
        """``ArgumentParser.add_argument``; ``aliases``: old spellings of the first flag, hidden from help."""
        action = super().add_argument(*args, **kwargs)
        for old_flag in aliases:
            self.add_alias(old_flag, action.option_strings[0])
        return action

    def add_alias(self, old_flag: str, new_flag: str) -> None:
        """Accept ``old_flag`` (alone or as ``old_flag=VALUE``) as ``new_flag``, without listing it in help."""
        if new_flag not in self._option_string_actions:
            raise ValueError(f"alias {old_flag}: no flag {new_flag}")
        if old_flag in self._option_string_actions or old_flag in self._aliases:
            raise ValueError(f"alias {old_flag}: already a flag")
        self._aliases[old_flag] = new_flag

    def add_argument_group(self, *args, **kwargs):
        group = _HelpRequiredGroup(self, *args, **kwargs)
        self._action_groups.append(group)
        return group

    def parse_known_args(self, args=None, namespace=None):
        self._typed = {}
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._documented_spellings(args), namespace)

    def as_typed(self, flag: str) -> str:
        """``flag`` as the last parsed command line spelled it (an old alias, or ``flag`` itself)."""
        return self._typed.get(flag, flag)

    def _documented_spellings(self, args: list[str]) -> list[str]:
        """``args`` with old flag spellings replaced by the documented ones (up to a ``--``)."""
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            old, eq, value = arg.partition("=")
            if old in self._aliases:
                self._typed[self._aliases[old]] = old
                arg = self._aliases[old] + eq + value
            out.append(arg)
        return out


class _HelpRequiredGroup(argparse._ArgumentGroup):
    """The argument group of a ``Parser``: every action added to it must have help."""

    def _add_action(self, action):
        if action.help is None:
            raise ValueError(f"{'/'.join(action.option_strings) or action.dest}: every flag needs help=...")
        return super()._add_action(action)


class Positive(argparse.Action):
    """Store a number (``type``, default int) that must be > 0; anything else is a usage error naming the flag."""

    def __init__(self, option_strings, dest, type=int, **kwargs):
        super().__init__(option_strings, dest, type=type, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if value <= 0:
            flag = parser.as_typed(option_string) if isinstance(parser, Parser) else option_string
            parser.error(f"{flag} must be positive, got {value}")
        setattr(namespace, self.dest, value)


def make_parser(doc: str, prog: str | None = None) -> Parser:
    """The parser of a command whose ``--help`` starts with ``doc`` (its usage lines, kept as written)."""
    return Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


@contextmanager
def user_errors(*extra: type[BaseException]):
    """Turn ``USER_ERRORS`` (and ``extra``, e.g. RuntimeError from a corrupt file) into
    ``sys.exit("error: MESSAGE")``: status 1, the message on stderr, no traceback."""
    try:
        yield
    except (*USER_ERRORS, *extra) as err:
        sys.exit(f"error: {err}")
