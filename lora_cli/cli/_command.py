"""How every command's help reads: usage lines as README writes them, flags without a type.

Typer shows required arguments as `{base}` and a variadic one as `{ADAPTER... OUT}...` in the usage line, and a
`<bool>` type beside every flag; README writes `loractl merge [OPTIONS] BASE ADAPTER... OUT`.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption


class _Argument(TyperArgument):
    def display_type_rich(self, ctx: Any) -> str | None:
        return None  # the metavar (BASE, ADAPTER... OUT) says it; "<list[str]>" adds nothing


class LoractlCommand(TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""  # a flag takes no value: no "<bool>" beside it
            elif isinstance(param, TyperArgument):
                if param.metavar is None:
                    param.metavar = (param.name or "").upper() + ("..." if param.nargs != 1 else "")
                param.__class__ = _Argument  # typer builds the parameters itself; this only changes their help

    def get_help_option(self, ctx: Any) -> Any:
        return _no_type(super().get_help_option(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar or ""
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class LoractlGroup(TyperGroup):
    """The top level: `--version` and `--help` without "<bool>" either."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""

    def get_help_option(self, ctx: Any) -> Any:
        return _no_type(super().get_help_option(ctx))


def _no_type(option: Any) -> Any:
    if option is not None and getattr(option, "metavar", None) is None:
        option.metavar = ""
    return option
