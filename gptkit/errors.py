"""The project's own error type: a user error that the CLI prints as one line.

INTERFACES.md: `error: <what> (<file or option>): <hint>`, exit code 2, no traceback.
"""

from pathlib import Path


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


def make_dir(path, where: str):
    """mkdir -p for an output the user named: a failure is a user error naming the path, not a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GptkitError(f"cannot create directory: {e.strerror or e}", path,
                          f"choose another {where}, or check that every part of the path is a writable directory"
                          ) from None
    return path
