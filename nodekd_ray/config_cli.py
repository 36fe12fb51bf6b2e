"""Command-line options generated from dataclass fields: the flag, its type, its default and its help are written
once, in the dataclass (a field's metadata "help"), and the parser and the config are built from them."""
from __future__ import annotations

import dataclasses


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(group, cls, names) -> None:
    """One option per field in ``names`` of dataclass ``cls``: bools that default to False become switches,
    everything else takes a value of the default's type. The help is the field's metadata "help" and its default."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        help_text = f.metadata.get("help")
        if help_text is None:
            raise TypeError(f"{cls.__name__}.{name} has no metadata help: the command line would have none")
        if isinstance(f.default, bool):
            if f.default:
                raise TypeError(f"{cls.__name__}.{name}: a switch must default to False")
            group.add_argument(_flag(name), dest=name, action="store_true", help=help_text)
        else:
            group.add_argument(_flag(name), dest=name, type=type(f.default), default=f.default,
                               help=f"{help_text} (default: {f.default:g})" if isinstance(f.default, float)
                               else f"{help_text} (default: {f.default})")


def dataclass_values(args, names) -> dict:
    """The parsed values of the generated options, by field name."""
    return {name: getattr(args, name) for name in names}
