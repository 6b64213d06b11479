"""The CLI shell: every verb has --help; UserError -> exit 2 without traceback; typer.Exit codes survive."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from onecard.cli import VERBS, main


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    try:
        main([verb, "--help"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip()]
    usage = next(i for i, line in enumerate(lines) if line.startswith("Usage:"))
    assert f" {verb} " in lines[usage] + " "
    assert lines[usage + 1][0].isalpha(), "no description under the usage line (the command needs a docstring)"


def test_exit_codes_from_commands_are_kept(monkeypatch):
    import onecard.cli as cli

    app = typer.Typer()

    @app.command()
    def fail() -> None:
        raise typer.Exit(1)

    @app.command()
    def ok() -> None:
        pass

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as exc:
        cli.main(["fail"])
    assert exc.value.code == 1
    cli.main(["ok"])  # success: no SystemExit with a non-zero code


def test_user_error_is_one_message_exit_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name_or_path: llama-3-8b\ntraining:\n  learning_rate: -1\n")
    proc = subprocess.run([sys.executable, "-m", "onecard.cli", "lint", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "learning_rate" in proc.stderr


@pytest.mark.parametrize("argv,says", [(["plan", "--seq-len", "2048"], "No such option: --seq-len"),
                                       (["train"], "Missing argument"),
                                       (["plan", "--batch", "abc"], "Invalid value for '--batch'")])
def test_usage_errors_are_click_messages_exit_2(argv, says, capsys):
    """typer >= 0.22 raises usage errors from its vendored click: they must still end as a message, never a
    traceback (onecard.cli._is_click_error)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
