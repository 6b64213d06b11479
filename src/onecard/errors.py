"""User-facing errors.

Anything the user can fix (a bad recipe, a bad data line, a missing model directory) is raised as
:class:`UserError`. The CLI prints it as one short message -- where, what, how to fix -- and exits 2,
never with a traceback. Bugs in onecard itself stay ordinary exceptions.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error in the user's input, reported without a traceback.

    where: the file (and line) or recipe field at fault, e.g. ``data.jsonl:17`` or ``training.learning_rate``.
    what: what is wrong. fix: what to do about it. ``exit_code``: 2, or a subclass's own (a run stopped by a
    signal exits 128 + its number).
    """

    exit_code = EXIT_USER_ERROR

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        return f"{head}\n  fix: {self.fix}" if self.fix else head
