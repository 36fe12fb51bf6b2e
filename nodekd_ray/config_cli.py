"""Command-line options generated from dataclass fields: the flag, its type, its choices, its default and its help
are written once, in the dataclass (a field's metadata, made by ``opt``), and both command lines (``nodekd`` and
the sweep scripts) are built from them.

A field's metadata:
  help      the help text (required: a field without it cannot become an option)
  flag      the option's name when it is not the field's (SweepSpec.temperatures is ``--T``, as in nodekd)
  aliases   older names, still accepted on the command line and in --config files, not shown in --help
  choices   the allowed values
  parse     a function from the command-line string to the field's value
  type      the type of one value, where the annotation does not say (a bare ``tuple`` with an empty default)
  convert   for callers: the parsed values to the field's value (``--eps 0 8/255`` to SweepSpec.eps_255)
  metavar   how --help names the value
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import typing


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that an error is one line naming the field, ``PROG: error: FIELD: what is wrong``, and
    exit 2 (argparse's own prints the usage first, and names the flag)."""

    def error(self, message):
        m = re.match(r"argument (--[\w-]+)(?:/[^:]*)?: (.*)$", message, re.S)
        if m:
            flag = m.group(1)
            action = self._option_string_actions.get(flag)
            if action is not None and action.help == argparse.SUPPRESS:   # an older name: say the current one
                flag = next((a.option_strings[0] for a in self._actions if a.dest == action.dest and a.option_strings
                             and a.help != argparse.SUPPRESS), flag)
            message = f"{flag[2:].replace('-', '_')}: {m.group(2)}"
        self.exit(2, f"{self.prog.split()[0]}: error: {message}\n")


def opt(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING, **meta):
    """A dataclass field whose metadata makes it a command-line option (see the module's docstring)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **meta})


def flag_name(f: dataclasses.Field) -> str:
    """The option a field becomes, without the dashes, in the config files' spelling (underscores)."""
    return f.metadata.get("flag", f.name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {text!r}")
    return text == "on"


def _value_type(cls, f: dataclasses.Field):
    """The type of one value of the field: Optional[X] and tuple[X, ...] are unwrapped; a bare tuple's values are
    of its default's first element's type."""
    tp = typing.get_type_hints(cls).get(f.name, str)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and typing.get_origin(tp) is not tuple:          # Optional[X] / X | None
        tp = args[0]
    if tp is tuple or typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)
        if inner:
            return inner[0]
        default = f.default if f.default is not dataclasses.MISSING else ()
        return type(default[0]) if default else str
    return tp


def _default_text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return " ".join(_default_text(v) for v in value)
    return str(value)


def add_dataclass_arguments(group, cls, names, *, many: bool = False, unset: str | None = None) -> None:
    """One option per field in ``names`` of dataclass ``cls``, typed, with choices and help from the field.

    many: a tuple field takes one or more values (``--T 3 10 20``). unset: the options default to None (nothing
    given: the caller keeps its own value) and their help says ``(default: UNSET)``; without it the default is the
    field's. Bools that default to False become switches (``negate``: a ``--no-...`` switch that sets False)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        help_text = f.metadata.get("help")
        if not help_text:
            raise TypeError(f"{cls.__name__}.{name} has no metadata help: the command line would have none")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = _flag(flag_name(f))
        kw = {"dest": name}
        if isinstance(default, bool):
            if f.metadata.get("negate"):
                group.add_argument("--no-" + flag[2:], action="store_false", default=True, help=help_text, **kw)
            elif default:
                raise TypeError(f"{cls.__name__}.{name}: a switch must default to False (or be negated)")
            else:
                group.add_argument(flag, action="store_true", help=help_text, **kw)
            _aliases(group, f, kw, action="store_true")
            continue
        vtype = f.metadata.get("type") or _value_type(cls, f)
        if "parse" in f.metadata:
            kw["type"] = f.metadata["parse"]
        elif vtype is bool:                      # Optional[bool]: on / off
            kw["type"], kw["metavar"] = _on_off, "{on,off}"
        elif vtype in (int, float, str):
            kw["type"] = vtype
        if "choices" in f.metadata:
            kw["choices"] = tuple(f.metadata["choices"])
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
        if many and isinstance(default, tuple) and "parse" not in f.metadata:
            kw["nargs"] = "+"
        kw["default"] = None if unset is not None else default
        shown = unset if unset is not None else (_default_text(default) if default is not None else None)
        paper = f" (paper: {shown})"
        if shown is not None and help_text.endswith(paper):     # the default is the paper's: say it once
            kw["help"] = f"{help_text[:-len(paper)]} (default: {shown}, the paper's)"
        else:
            kw["help"] = f"{help_text} (default: {shown})" if shown is not None else help_text
        group.add_argument(flag, **kw)
        _aliases(group, f, kw)


def _aliases(group, f, kw, action=None) -> None:
    """Older names of an option: parsed into the same field, shown nowhere."""
    for alias in f.metadata.get("aliases", ()):
        extra = {k: v for k, v in kw.items() if k not in ("help", "default")}
        if action:
            extra["action"] = action
        group.add_argument(_flag(alias), default=argparse.SUPPRESS, help=argparse.SUPPRESS, **extra)


def dataclass_values(args, names) -> dict:
    """The parsed values of the generated options, by field name."""
    return {name: getattr(args, name) for name in names}


def given_values(args, names) -> dict:
    """The generated options that were given (not None), by field name: overrides on top of a caller's values."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
