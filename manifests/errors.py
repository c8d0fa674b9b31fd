"""How errors reach people: one line, naming what failed, and nothing a terminal would interpret.

Exceptions come wrapped (Ray wraps an actor's exception in its own, botocore in aiohttp's); :func:`one_line` digs out
the innermost cause. Text that came from untrusted input (a manifest's row ids, a file's bytes) goes through
:func:`printable` before it is printed, so control characters cannot rewrite a terminal.
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(exc: BaseException) -> str:
    """One line for an exception that may be wrapped (Ray, botocore): the innermost cause, its type and the first
    line of its message."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None or inner is exc or not isinstance(inner, BaseException):
            break
        exc = inner
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip() and not line.startswith(("Traceback", "ray::"))), "")
    return printable(redact(f"{type(exc).__name__}: {first}" if first else type(exc).__name__))


def redact(text: str) -> str:
    """``text`` with the user-info part of any URL in it hidden (``s3://KEY:SECRET@host/x`` -> ``s3://***@host/x``)."""
    return _USERINFO.sub(r"\1***@", text)


def printable(text: str) -> str:
    """``text`` with control characters (escape sequences, carriage returns, newlines, tabs) shown as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        text.replace("\n", "\\n").replace("\t", "\\t"))
