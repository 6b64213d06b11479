"""PatchHandle: every change the patching layer makes to a model *instance*, and its undo.

Patches are instance attributes (``module.forward = bound fn``), never class or module globals, so
two models in one process can run with and without kernels side by side, and ``revert()`` restores
exactly what was there (an instance ``forward`` that existed before, e.g. from accelerate hooks).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

_MISSING = object()


@dataclass
class PatchHandle:
    kernels: str = "none"
    model_type: str | None = None
    patched: dict[str, int] = field(default_factory=dict)  # what -> how many modules
    notice: str | None = None  # one line for the user when something fell back
    _undo: list = field(default_factory=list, repr=False)  # callables, run newest first

    @property
    def active(self) -> bool:
        return bool(self.patched)

    def set_forward(self, module, fn, what: str) -> None:
        """Bind ``fn(module, ...)`` as ``module.forward`` on this instance; remember the old one."""
        old = module.__dict__.get("forward", _MISSING)
        module.forward = types.MethodType(fn, module)

        def undo():
            if old is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = old

        self.add_undo(undo)
        self.patched[what] = self.patched.get(what, 0) + 1

    def add_notice(self, line: str) -> None:
        """Say in one line what fell back (logged now, shown by the caller)."""
        self.notice = line if self.notice is None else f"{self.notice}; {line}"
        logging.getLogger("onecard.patch").warning(line)

    def add_undo(self, fn) -> None:
        self._undo.append(fn)

    def absorb(self, other: "PatchHandle") -> None:
        """Take over ``other``'s undos and counts (one handle for patches applied part by part)."""
        self._undo += other._undo
        other._undo = []
        for key, n in other.patched.items():
            self.patched[key] = self.patched.get(key, 0) + n

    def revert(self) -> None:
        """Undo every patch, newest first. Calling it twice is harmless."""
        while self._undo:
            self._undo.pop()()
        self.patched.clear()

    def summary(self) -> str:
        if not self.patched:
            return f"kernels: {self.kernels} (nothing patched)"
        parts = ", ".join(f"{k} x{v}" for k, v in sorted(self.patched.items()))
        return f"kernels: {self.kernels} on {self.model_type}: {parts}"
