"""The `gfgp` command line: a click group whose commands are thin wrappers over the library.

Each command lives in ``gfgp_cli/commands/<name>.py`` and imports torch only when it runs, so
``gfgp --help`` stays fast. Errors are mapped here, once: bad input (``ValueError``,
``OSError``) exits 2 with a one-line message, failed work (``WorkFailedError``) exits 1;
``--debug`` also prints the traceback; the exit code is the same. A Ctrl-C that ends a command at once
prints "Aborted!" and exits 130.
"""

from __future__ import annotations

import errno
import sys
import traceback

import click

from . import __version__
from .errors import WorkFailedError

__all__ = ["cli", "main"]


class BadInput(click.ClickException):
    exit_code = 2


class _GFGPGroup(click.Group):
    """A group that turns library exceptions into one-line messages and exit codes.

    With ``--debug`` the traceback is printed first; the exit code stays the same.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            _traceback_if_debug(ctx)
            click.echo("Aborted!", err=True)
            raise click.exceptions.Exit(130) from None  # the shell's code for a process stopped by Ctrl-C
        except WorkFailedError as e:
            _traceback_if_debug(ctx)
            raise click.ClickException(_one_line(e)) from e
        except OSError as e:
            _traceback_if_debug(ctx)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a write outside gfgp's atomic writers
                where = f" writing {e.filename}" if e.filename else ""
                raise click.ClickException(f"no space left on device{where}; free some space and run again") from e
            raise BadInput(_one_line(e)) from e
        except (ValueError, EOFError) as e:
            _traceback_if_debug(ctx)
            raise BadInput(_one_line(e)) from e


def _traceback_if_debug(ctx: click.Context) -> None:
    if ctx.meta.get("gfgp.debug"):
        traceback.print_exc()


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.strerror}: {e.filename}"
    return " ".join(text.split())


@click.group(cls=_GFGPGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="gfgp")
@click.option("--debug", is_flag=True, help="Also print the full traceback of an error (the exit code stays the same).")
@click.option("--release-cpu-memory", is_flag=True,
              help="Keep glibc's default of handing large freed blocks back to the OS at once. By default "
                   "gfgp keeps them for reuse, which makes CPU training much faster (no page faults on "
                   "every new activation) and keeps the process at its peak memory until it exits.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, release_cpu_memory: bool) -> None:
    """Global Feature Guided Local Pooling (Kobayashi, ICCV 2019) for any torchvision CNN.

    \b
    Examples:
      gfgp convert resnet50 --out m.pt
      gfgp train m.pt --data digits --out run/
      gfgp export run/best.pt --onnx m.onnx
    """
    ctx.meta["gfgp.debug"] = debug
    if not release_cpu_memory:
        from .cpu_memory import reuse_freed_memory

        reuse_freed_memory()


def _register() -> None:
    """Attach every command module's commands.

    Each module exports ``COMMANDS`` (top-level commands and groups) and may export
    ``SUBCOMMANDS``, a mapping from a group's name to commands to add to that group (so that
    ``gfgp bench export`` lives next to the export code).
    """
    import importlib
    import pkgutil

    from . import commands

    modules = [importlib.import_module(f"{commands.__name__}.{info.name}")
               for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name)]
    for module in modules:
        for command in getattr(module, "COMMANDS", ()):
            cli.add_command(command)
    for module in modules:
        for group, subcommands in getattr(module, "SUBCOMMANDS", {}).items():
            for command in subcommands:
                cli.commands[group].add_command(command)


_register()


def main(argv=None) -> None:
    cli.main(args=argv, prog_name="gfgp")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
