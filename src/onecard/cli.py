"""The ``onecard`` command line: one module per verb under ``onecard.commands``.

Each verb module exposes ``register(app)``; this file only assembles them and turns
:class:`~onecard.errors.UserError` into a short message and exit code 2. Verb modules import torch
lazily, inside the command, so ``onecard plan`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

import typer

from onecard.errors import UserError

VERBS = ["demo", "data", "train", "plan", "scope", "lint", "eval", "export", "report", "bench", "models", "gpus"]

app = typer.Typer(
    name="onecard",
    help="Plan, check, run, evaluate and export LLM fine-tunes on one GPU, with numbers that hold.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _verb in VERBS:
    importlib.import_module(f"onecard.commands.{_verb}").register(app)


def print_user_error(err: UserError) -> None:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    from rich.markup import escape

    console.print(f"[bold red]error[/bold red] {escape(err.render())}", soft_wrap=True)  # [q_proj] is no style


def quiet_libraries() -> None:
    """Keep library chatter out of onecard's output (a user can still turn it back on by env).

    transformers warns on every tokenizer load (clean_up_tokenization_spaces) and about its own deprecations
    (FutureWarning), and bitsandbytes logs, on CPUs with AVX512-BF16, that an optional hub kernel is missing;
    none is actionable for a onecard user.
    Progress bars on long library work (GGUF de-quantisation) are kept.
    """
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Deprecation notices addressed to library callers (transformers 5.24: gradient_checkpointing_enable ->
    # activation_checkpointing_enable, still called by peft and accelerate), not to a onecard user.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)(\.|$)")


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    try:
        rc = app(args=argv, standalone_mode=False)  # without standalone mode, click *returns* typer.Exit's code
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except UserError as err:
        print_user_error(err)
        sys.exit(err.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        if _is_click_error(exc):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _is_click_error(exc: BaseException) -> bool:
    """A click usage error (unknown option, missing argument, bad value). typer >= 0.22 raises those from its own
    vendored copy of click (``typer._click``), whose classes are not ``click.exceptions``' -- matching by class
    let ``onecard plan --no-such-option`` end in a traceback -- so they are recognised by what they carry."""
    import click

    if isinstance(exc, click.exceptions.ClickException):
        return True
    return callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int)


if __name__ == "__main__":
    main()
