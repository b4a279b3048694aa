"""User-facing errors: the CLI prints their message and exits with code 2, without a traceback."""

from __future__ import annotations

from pathlib import Path


class CtcspecError(Exception):
    """A problem with the user's input or environment, described in plain words."""


def read_text_file(path: str | Path, what: str) -> str:
    """A user's UTF-8 text file, or a CtcspecError naming `what` it is and why it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CtcspecError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise CtcspecError(f"{what} {str(path)!r} is a directory, not a file") from None
    except OSError as exc:
        raise CtcspecError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise CtcspecError(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start})") from None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line of at most `limit` characters (transformers' often span many)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyError):  # its message is the bare key
        text = f"missing key {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
