"""Passwords out of messages: a storage URL masked, and every piece of its secrets scrubbed from a
driver's error text, however the driver split the URL. Used wherever a message may quote a
``--storage`` value (the storage layer and the CLI's last-resort handler), so it needs nothing
but the standard library."""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import unquote, unquote_plus

__all__ = ["has_scheme", "mask_url", "safe_reason", "scrub"]

#: A URL's scheme (``postgresql+psycopg2://``, ``sqlite:///``): a ``--storage`` value without one
#: is not shown in messages at all (it may be a password pasted in the wrong place).
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
#: Query parameters whose values are secrets (``?password=...``, ``?sslpassword=...``).
_SECRET_PARAM = re.compile(r"([?&;][^=&#;]*(?:pass|pwd|secret|token)[^=&#;]*=)([^&#;]*)", re.IGNORECASE)


def has_scheme(text: str) -> bool:
    """Whether ``text`` starts with a URL scheme (``postgresql+psycopg2://``, ``sqlite:///``)."""
    return bool(_SCHEME.match(text))


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ``***``: secret query parameters, and all before the *last* ``@``
    but the user name (a password with an unescaped ``@`` is masked whole). Never needs to parse ``url``."""
    m = _SCHEME.match(url)
    head, rest = (url[: m.end()], url[m.end() :]) if m else ("", url)
    rest = _SECRET_PARAM.sub(r"\1***", rest)
    at = rest.rfind("@")
    if at >= 0:
        userinfo = rest[:at]
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        elif "@" in userinfo:  # several @ and no ':' — no telling user from password
            userinfo = "***"
        rest = userinfo + rest[at:]
    return head + rest


def _userinfo_password(url: str) -> Optional[str]:
    """The password in ``url``'s user info (between the first ``:`` after the scheme and the last ``@``), or None."""
    m = _SCHEME.match(url)
    rest = _SECRET_PARAM.sub(lambda pm: pm.group(1), url[m.end() :] if m else url)
    at = rest.rfind("@")
    return rest[:at].split(":", 1)[1] if at >= 0 and ":" in rest[:at] else None


def _secrets(url: str) -> list[str]:
    """The password and secret query parameters of ``url`` (as written and URL-decoded), longest first, with
    the pieces of the password between ``@`` of at least 4 characters (a driver splitting at the first ``@``)."""
    m = _SCHEME.match(url)
    found = [pm.group(2) for pm in _SECRET_PARAM.finditer(url[m.end() :] if m else url)]
    pw = _userinfo_password(url)
    if pw is not None:
        found.append(pw)
        found.extend(piece for piece in pw.split("@") if len(piece) >= 4)
    out: set[str] = set()
    for f in found:
        out.update(x for x in (f, unquote(f), unquote_plus(f)) if x)
    return sorted(out, key=len, reverse=True)


#: Shortest piece of a password replaced wherever it appears in a message (shorter ones would
#: garble ordinary words; a whole password shorter than this is still replaced).
_MIN_PIECE = 4


def scrub(text: str, url: Optional[str], *, pieces: bool = True) -> str:
    """``text`` (e.g. a driver's error message) without any part of a password from ``url``.

    Replaced: ``url`` (by its masked form), every secret of :func:`_secrets`, and every remaining
    piece of at least 4 characters of one (as written or URL-decoded), however a parser split the
    URL (at the first ``@``, at a ``:`` taken for a port, ...); a shorter password only whole.
    Pieces the masked URL shows too (user, host, database) are kept.

    Args:
        text: The message.
        url: The storage URL (None or empty: ``text`` is returned as is).
        pieces: Also replace pieces of the password (a driver's text); False replaces the URL, the
            whole password and what a parser glued to the host only (rapid-search's own lines).
    """
    if not url:
        return text
    text = text.replace(url, mask_url(url))
    secrets = _secrets(url)
    for secret in secrets:
        text = text.replace(secret, "***")
    pw = _userinfo_password(url) or ""
    # a parser that splits at the first @ takes the tail after each inner @ for the host
    for i in [i for i, c in enumerate(pw) if c == "@"]:
        tail = pw[i + 1 :]
        if tail:
            text = text.replace(tail + "@", "***@")
    # every piece (substring) of every secret still in the text
    public = mask_url(url)
    for secret in secrets if pieces else ():
        for form in {secret, unquote(secret), unquote_plus(secret)}:
            text = _cut_pieces(text, form, public)
    # short pieces: what a parser split off at a URL delimiter and reported on its own (a host,
    # a port), replaced where they stand as a whole token; and any tail of the password it
    # glued to the real host (``gh@127.0.0.1`` from ``user:ab:cd@ef:gh@127.0.0.1``)
    host = re.split(r"[:/?#\[\]]", url[url.rfind("@") + 1 :], maxsplit=1)[0] if "@" in url else ""
    for secret in secrets:
        for piece in sorted({p for p in re.split(r"[@:/?#\[\]]", secret) if p}, key=len, reverse=True) if pieces else ():
            if piece not in public:
                text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(piece)}(?![A-Za-z0-9])", "***", text)
        if host:
            for i in range(len(secret)):
                tail = secret[i:]
                if "*" not in tail:
                    text = text.replace(f"{tail}@{host}", f"***@{host}")
    return text


def _cut_pieces(text: str, secret: str, public: str) -> str:
    """``text`` with every longest run of at least ``min(4, len(secret))`` characters that is a piece of
    ``secret`` (and not of ``public``) replaced by ``***``, left to right."""
    least = min(_MIN_PIECE, len(secret))
    if not least:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        j = i
        while j < len(text) and text[i : j + 1] in secret:
            j += 1
        if j - i >= least and text[i:j].strip("*") and text[i:j] not in public:
            out.append("***")
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def safe_reason(e: BaseException, spec: Optional[str]) -> str:
    """``ExceptionClass: first line`` of ``e`` (of the driver's error behind it), any password of ``spec`` removed."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    first = text[0] if text else e.__class__.__name__
    return scrub(f"{e.__class__.__name__}: {first}", spec or "")[:300]
