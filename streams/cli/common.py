"""What every command shares, in `inferstream` and in the checkout's dev commands (infra.local):
help without type tags, errors in one line, the consoles and the settings.

Commands import what they use when they run: `--help` and the simple reads load no numpy, faust,
aiokafka or onnxruntime. A user's mistake prints one `error:` line and exits 2; an unexpected error
prints one line too and exits 1 (`--debug` shows its traceback instead).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer import _click as click  # typer's own copy of click: its commands, contexts and exceptions
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

if TYPE_CHECKING:
    from streams.settings import Settings

USER_ERROR = 2  # the exit status of a refused command: bad input, a taken port, a missing id
INTERNAL_ERROR = 1  # an unexpected error (a bug, or a service that failed mid-command)

console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def get_settings() -> Settings:
    from streams.settings import get_settings as settings

    return settings()


def error(message: str) -> None:
    err_console.print(Text.assemble(("error:", "red"), " ", message))


def fail(message: str) -> NoReturn:
    """Refuse the command: one line, exit status 2."""
    error(message)
    raise typer.Exit(USER_ERROR)


@contextmanager
def refusing(*errors: type[Exception]) -> Iterator[None]:
    """An error of these types raised in the block is the user's mistake: its message refuses the
    command."""
    try:
        yield
    except errors as exc:
        fail(str(exc))


# -- help without type tags, errors in one line -----------------------------------------------


class _Argument(TyperArgument):
    """An argument shown by its name (NAME), without `{name}` braces or a `<str>` type tag."""

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return None

    def _rich_display_name(self) -> str:
        name = self.metavar or (self.name or "").upper()
        return f"{name}..." if self.nargs != 1 else name

    def _usage_display_name(self) -> str:
        name = self._rich_display_name()
        return name if self.required else f"[{name}]"


class _Option(TyperOption):
    """An option shown without a type tag (`<bool>`, `<int>`...): its help says what it takes."""

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return self.metavar


def _plain(param: click.Parameter) -> click.Parameter:
    if type(param) is TyperArgument:
        param.__class__ = _Argument
    elif type(param) is TyperOption:
        param.__class__ = _Option
    return param


def _debug_requested(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("debug"))


def _describe(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class _Command(TyperCommand):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return [_plain(p) for p in super().get_params(ctx)]

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except Exception as exc:
            if _debug_requested(ctx):
                raise
            error(f"{_describe(exc)} ({type(exc).__name__}; --debug shows the traceback)")
            raise typer.Exit(INTERNAL_ERROR) from None


class _Group(TyperGroup):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return [_plain(p) for p in super().get_params(ctx)]


class CommandGroup(typer.Typer):
    """A typer app whose commands show help without type tags and report errors in one line."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=_Group, no_args_is_help=True, add_completion=False,
                         pretty_exceptions_enable=False, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        register = super().command(*args, **kwargs)

        def decorator(function: Any) -> Any:
            # Rich help keeps a docstring's line breaks: one line per paragraph reflows to the terminal.
            if function.__doc__:
                paragraphs = inspect.cleandoc(function.__doc__).split("\n\n")
                function.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
            return register(function)

        return decorator


def command_line(help: str, groups: list[CommandGroup]) -> CommandGroup:
    """A command line's root: the `--debug` option, and the commands of `groups` (a group with a
    name is a subcommand; one without adds its commands to the root)."""
    root = CommandGroup(help=help)

    @root.callback()
    def options(
        debug: Annotated[bool, typer.Option("--debug", envvar="INFERSTREAM_DEBUG",
                                            help="show the full traceback of an unexpected error")] = False,
    ) -> None:
        """Nothing to do here: a failing command reads `--debug` from its root context."""

    for group in groups:
        root.add_typer(group)
    return root


def run(app: CommandGroup) -> NoReturn:
    """A command line's entry point: a usage error (unknown option, bad value) is one line too."""
    try:
        code = app(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        code = 0
    except click.exceptions.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        error(" ".join(exc.format_message().split()) + hint)
        code = exc.exit_code
    except typer.Abort:
        code = INTERNAL_ERROR
    sys.exit(code if isinstance(code, int) else 0)
