"""User-facing errors: one line naming the field and the fix, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The CLI prints ``str(err)`` on one line and exits with code 2."""

    exit_code = 2

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field, self.problem, self.fix = field, problem, fix
        message = f"{field}: {problem}" if field else problem
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf. Training stops; the last good checkpoint is kept."""
