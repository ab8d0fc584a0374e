"""A `multipart/form-data` body (RFC 7578), already read whole within the body limit, → its parts.

OpenAI's audio endpoints take a form upload: one part per field, `file` carrying the audio. The body
arrives through `app.read_body` (Content-Length checked, bytes counted, a deadline), so it is parsed here
from memory with `bytes.find` (linear in its size, one copy per part) rather than through a streaming
parser, which would be a new dependency (python-multipart) for what is a few delimiters:

    --BOUNDARY CRLF  headers CRLF CRLF  data  CRLF --BOUNDARY ...  CRLF --BOUNDARY-- [epilogue]

Each part needs `Content-Disposition: form-data; name="..."` (`filename="..."` marks a file); its other
headers are kept as given (`content-type`). Every malformed body is an `APIError` 400 naming what is wrong:
no boundary, a part without a name, a body that ends before its closing delimiter, more than `MAX_PARTS`
parts, headers over `MAX_HEAD` bytes, names that are not UTF-8.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import bad

MAX_PARTS = 64  # parts in one form
MAX_HEAD = 16 * 1024  # bytes of one part's headers


@dataclass
class Part:
    name: str
    data: bytes
    filename: str | None = None  # set for a file part (possibly "")
    content_type: str | None = None


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """`form-data; name="a"; filename="b c"` → ("form-data", {"name": "a", "filename": "b c"}); names lower-cased,
    quoted strings unescaped (a backslash quotes the next character)."""
    main, _, rest = value.partition(";")
    params, i, n = {}, 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        j = i
        while j < n and rest[j] not in "=;":
            j += 1
        key = rest[i:j].strip().lower()
        i = j
        val = ""
        if i < n and rest[i] == "=":
            i += 1
            while i < n and rest[i] in " \t":
                i += 1
            if i < n and rest[i] == '"':
                i += 1
                chars = []
                while i < n and rest[i] != '"':
                    if rest[i] == "\\" and i + 1 < n:
                        i += 1
                    chars.append(rest[i])
                    i += 1
                i += 1  # the closing quote
                val = "".join(chars)
            else:
                j = i
                while j < n and rest[j] != ";":
                    j += 1
                val, i = rest[i:j].strip(), j
        if key:
            params[key] = val
    return main.strip().lower(), params


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type header; a 400 for any other type."""
    kind, params = header_params(content_type or "")
    if kind != "multipart/form-data":
        raise bad(f"the body must be multipart/form-data (a form upload with a 'file' part), got Content-Type "
                  f"{(content_type or 'none')[:80]!r}", None, "invalid_content_type")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 70 or not boundary.isascii():
        raise bad("the multipart/form-data Content-Type has no valid boundary (1–70 ASCII characters)", None, "invalid_content_type")
    return boundary.encode("ascii")


def parse_form(body: bytes, content_type: str | None) -> list[Part]:
    """The parts of a form body, in order."""
    dash = b"--" + boundary_of(content_type)
    broken = "the multipart body is malformed"
    if body.startswith(dash):
        pos = len(dash)
    else:  # a preamble, ignored, ends at the first delimiter line
        at = body.find(b"\r\n" + dash)
        if at < 0:
            raise bad(f"{broken}: its boundary never occurs", None, "invalid_multipart")
        pos = at + 2 + len(dash)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):  # the closing delimiter; anything after it is an epilogue
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise bad(f"{broken}: a boundary line is not followed by CRLF", None, "invalid_multipart")
        if len(parts) == MAX_PARTS:
            raise bad(f"the form has more than {MAX_PARTS} parts", None, "invalid_multipart")
        head_end = body.find(b"\r\n\r\n", eol, eol + 2 + MAX_HEAD + 2)
        if head_end < 0:
            raise bad(f"{broken}: part {len(parts) + 1}'s headers do not end within {MAX_HEAD} bytes", None, "invalid_multipart")
        headers = {}
        for line in body[eol + 2 : head_end].split(b"\r\n") if head_end > eol else []:
            key, sep, value = line.partition(b":")
            if not sep:
                raise bad(f"{broken}: part {len(parts) + 1} has a header line without ':'", None, "invalid_multipart")
            try:
                headers[key.strip().lower().decode("ascii")] = value.strip().decode("utf-8")
            except UnicodeDecodeError:
                raise bad(f"{broken}: part {len(parts) + 1} has a header that is not UTF-8", None, "invalid_multipart") from None
        kind, params = header_params(headers.get("content-disposition", ""))
        if kind != "form-data" or not params.get("name"):
            raise bad(f"{broken}: part {len(parts) + 1} has no 'Content-Disposition: form-data; name=\"...\"' header", None,
                      "invalid_multipart")
        start = head_end + 4
        end = body.find(b"\r\n" + dash, start)
        if end < 0:
            raise bad(f"{broken}: it ends inside part '{params['name'][:40]}' (no closing boundary; was the upload cut short?)", None,
                      "invalid_multipart")
        parts.append(Part(params["name"], body[start:end], params.get("filename"), headers.get("content-type")))
        pos = end + 2 + len(dash)
