"""The project's own error type: a user error that the CLI prints as one line.

INTERFACES.md: `error: <what> (<file or option>): <hint>`, exit code 2, no traceback.
"""


class GptkitError(Exception):
    """A user error: bad file, option or value. `where` names the file or option."""

    def __init__(self, what: str, where: str = "", hint: str = ""):
        self.what, self.where, self.hint = what, str(where), hint
        super().__init__(self.line())

    def line(self) -> str:
        s = f"error: {self.what}"
        if self.where:
            s += f" ({self.where})"
        if self.hint:
            s += f": {self.hint}"
        return s
