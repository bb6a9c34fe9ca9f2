"""Secrets out of every output: access tokens, passwords, API keys, ... in JSON.

Pure functions, no I/O. Used by every place that shows or forwards bytes a sender wrote:
dead letters (`agents.security` registers `redact_raw` with
`streams.processing.redact_dead_letters`), `agentstream tail` and `agentstream replay`
(`redact_event_dict`, unless `--show-secrets`).

What is a secret
----------------
The value of every object member whose *name* is a secret key name, whatever the value's
type (string, number, boolean, list, object) and nesting depth, becomes the string
``"[REDACTED]"``; a ``null`` stays ``null`` (it holds nothing). A name is compared after
JSON unescaping (``"tok\\u0065n"`` is ``token``), NFKC normalisation and case folding
(fullwidth letters, ``"Token"``), with dashes, underscores, spaces and invisible format
characters removed (``"access-token"``, ``"Access_Token"``, ``"api key"``). The names
(`SECRET_KEYS`, normalised) are:

* ``token`` — `AuthProof.token`, the access token of an ``access-token`` proof;
* OAuth/session tokens: ``access_token``, ``refresh_token``, ``id_token``,
  ``auth_token``, ``session_token``, ``bearer_token``;
* API keys: ``api_key`` / ``apikey``, ``x-api-key``;
* passwords: ``password``, ``passwd``, ``passphrase``;
* shared secrets and key material: ``secret``, ``client_secret``, ``secret_key``,
  ``secret_access_key``, ``private_key``, and this project's keychain kinds
  ``signing_key`` and ``encryption_key``;
* HTTP credentials: ``authorization``, ``proxy-authorization``, ``cookie``,
  ``set-cookie``.

Names are matched exactly, not as substrings or suffixes: the LLM schemas' counters
(``prompt_tokens``, ``completion_tokens``, ``total_tokens``, ``max_tokens``) and names
such as ``token_count``, ``tokens``, ``key_id`` or ``signature`` (not secret: see
docs/security.md) are left alone.

Bytes (`redact_raw`)
--------------------
Valid JSON keeps every byte but the redacted values, so the output is valid JSON and the
rest of the original is there byte for byte. Every value of a secret name goes, one of a
name given twice in an object too (which a parse keeps only one of): the bytes are
returned unchanged on the strength of their parse only when the parse holds every value
they hold (`parse_holds_all`), else they are scanned. A document nested deeper than `MAX_DEPTH`
has every string and number of the too-deep part replaced too, member names included: it
is not inspected member by member (`redact_event_dict` replaces each container deeper
than `MAX_DEPTH` as a whole, so that what it returns can be encoded again).

Bytes that are not JSON (truncated, garbage) go through a fallback that fails closed.
Their strings are scanned left to right; a secret name (any spelling, ``\\u0074oken``
too) followed by ``:`` has its value blanked up to the end of that value: a string, a
balanced list/object, or a scalar up to the next ``,`` ``}`` ``]``. A value that cannot
be bounded (the input ends inside it) takes everything to the end, and so does a secret
name followed by what cannot follow a value, and a ``"<secret name>":`` the scan did
not see as a member (quotes out of step in garbage: a second pass tries every quote).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import orjson

REDACTED = "[REDACTED]"
_REDACTED_JSON = b'"[REDACTED]"'

#: containers nested deeper than this are not walked member by member: every string and
#: number in them is replaced (by `redact_event_dict`: the whole container)
MAX_DEPTH = 128

#: secret key names, normalised (see `normalise_key`)
SECRET_KEYS = frozenset(
    {
        "token",
        "accesstoken",
        "refreshtoken",
        "idtoken",
        "authtoken",
        "sessiontoken",
        "bearertoken",
        "apikey",
        "xapikey",
        "password",
        "passwd",
        "passphrase",
        "secret",
        "clientsecret",
        "secretkey",
        "secretaccesskey",
        "privatekey",
        "signingkey",
        "encryptionkey",
        "authorization",
        "proxyauthorization",
        "cookie",
        "setcookie",
    }
)
_SECRET_KEYS_BYTES = frozenset(k.encode() for k in SECRET_KEYS)

#: the event type whose payload carries another record's bytes, base64
DEAD_LETTER_TYPE = "pipeline.dead_letter"

_DROP_CATEGORIES = frozenset({"Pd", "Pc", "Zs", "Zl", "Zp", "Cf"})
_ASCII_SEPARATORS = b"-_ \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def normalise_key(key: str) -> str:
    """NFKC, case-folded, without dashes, underscores, spaces and format characters."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", key).casefold())
    return "".join(
        ch for ch in folded if not ch.isspace() and unicodedata.category(ch) not in _DROP_CATEGORIES
    )


_ASCII_DROP_STR = str.maketrans("", "", _ASCII_SEPARATORS.decode())
#: names longer than this are not remembered (the caches must stay small whatever a
#: hostile sender names its members)
_CACHED_NAME_LENGTH = 128


def is_secret_key(key: str) -> bool:
    """Whether a member named `key` (already unescaped) holds a secret."""
    return _is_secret_cached(key) if len(key) <= _CACHED_NAME_LENGTH else _is_secret(key)


def _is_secret(key: str) -> bool:
    if key.isascii():
        return key.lower().translate(_ASCII_DROP_STR) in SECRET_KEYS
    return normalise_key(key) in SECRET_KEYS


_is_secret_cached = lru_cache(maxsize=4096)(_is_secret)


def _is_secret_raw(raw: bytes) -> bool:
    """`is_secret_key` of a JSON string's content as it is in the bytes (escaped)."""
    if len(raw) <= _CACHED_NAME_LENGTH:
        return _is_secret_raw_cached(raw)
    return _is_secret_escaped(raw)


def _is_secret_escaped(raw: bytes) -> bool:
    if b"\\" not in raw and raw.isascii():
        return raw.lower().translate(None, _ASCII_SEPARATORS) in _SECRET_KEYS_BYTES
    return is_secret_key(_unescape(raw))


_is_secret_raw_cached = lru_cache(maxsize=4096)(_is_secret_escaped)


_ESCAPE = re.compile(
    r"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"
    r"|\\u([0-9a-fA-F]{4})|\\(.)",
    re.DOTALL,
)
_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _unescape_one(m: re.Match[str]) -> str:
    if m.group(1) is not None:
        high, low = int(m.group(1), 16), int(m.group(2), 16)
        return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
    if m.group(3) is not None:
        return chr(int(m.group(3), 16))
    ch = m.group(4)
    return _SIMPLE_ESCAPES.get(ch, ch)


def _unescape(raw: bytes) -> str:
    """The text of a JSON string's content (leniently: for broken input too)."""
    text = raw.decode("utf-8", "replace")
    return _ESCAPE.sub(_unescape_one, text) if "\\" in text else text


# -- parsed values ----------------------------------------------------------------------
#: member name → is_secret_key, for the walks over parsed values (bounded: cleared when full)
_NAME_CACHE: dict[Any, bool] = {}
_NAME_CACHE_MAX = 8192


def _secret_name(key: Any) -> bool:
    found = _NAME_CACHE.get(key)
    if found is None:
        if not isinstance(key, str):
            return False
        found = is_secret_key(key)
        if len(key) <= _CACHED_NAME_LENGTH:
            if len(_NAME_CACHE) >= _NAME_CACHE_MAX:
                _NAME_CACHE.clear()
            _NAME_CACHE[key] = found
    return found


def _needs_redaction(root: Any) -> bool:
    """Whether `root` holds a non-null value under a secret name, or nests deeper than
    `MAX_DEPTH` (iterative: no recursion limit). On the path of every replayed record:
    kept cheap (one dict lookup per member)."""
    if type(root) is not dict and type(root) is not list:
        return isinstance(root, dict | list) and _needs_redaction_slow(root)
    cache = _NAME_CACHE
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if type(node) is dict:
            for k, v in node.items():
                if v is not None:
                    secret = cache.get(k)
                    if secret or (secret is None and _secret_name(k)):
                        return True
                    t = type(v)
                    if t is dict or t is list:
                        stack.append((v, depth + 1))
        elif type(node) is list:
            for v in node:
                t = type(v)
                if t is dict or t is list:
                    stack.append((v, depth + 1))
        elif _needs_redaction_slow(node):
            return True
    return False


def _needs_redaction_slow(root: Any) -> bool:
    """`_needs_redaction` for subclasses of dict and list (not what JSON parsers make)."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(node, dict):
            for k, v in node.items():
                if v is not None and _secret_name(k):
                    return True
                if isinstance(v, dict | list):
                    stack.append((v, depth + 1))
        else:
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def _redacted_copy(root: dict[str, Any] | list[Any]) -> Any:
    """A copy of `root` with secret members' values replaced, and every container deeper
    than MAX_DEPTH replaced as a whole (what a CLI prints must stay encodable: orjson
    encodes at most 254 levels)."""
    out: Any = {} if isinstance(root, dict) else []
    stack: list[tuple[Any, Any, int]] = [(root, out, 1)]
    while stack:
        src, dst, depth = stack.pop()
        is_dict = isinstance(src, dict)
        items: Iterable[tuple[Any, Any]] = src.items() if is_dict else enumerate(src)
        for k, v in items:
            if is_dict and v is not None and _secret_name(k):
                new: Any = REDACTED
            elif isinstance(v, dict | list):
                if depth + 1 > MAX_DEPTH:
                    new = REDACTED
                else:
                    new = {} if isinstance(v, dict) else []
                    stack.append((v, new, depth + 1))
            else:
                new = v
            if is_dict:
                dst[k] = new
            else:
                dst.append(new)
    return out


def redact_event_dict(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a parsed event, or any parsed JSON) with every secret replaced, as
    `redact_raw` does for bytes. `data` itself is never changed: when nothing is secret
    it is returned as is (the check costs a dict lookup per member: `agentstream replay`
    runs it on every record), else a redacted copy.

    A dead letter (``pipeline.dead_letter``) carries another record's bytes base64 in
    ``payload.original_b64``: those bytes are redacted with `redact_raw` too."""
    out = _redacted_copy(data) if _needs_redaction(data) else data
    if not isinstance(out, dict) or out.get("type") != DEAD_LETTER_TYPE:
        return out
    payload = out.get("payload")
    original = payload.get("original_b64") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or not isinstance(original, str):
        return out
    try:
        raw = base64.b64decode(original, validate=True)
    except (binascii.Error, ValueError):
        return out  # not bytes of a record: shown as the string it is
    kept = redact_raw(raw)
    if kept == raw:
        return out
    if out is data:
        out = dict(data)
    out["payload"] = {**payload, "original_b64": base64.b64encode(kept).decode()}
    return out


# -- bytes ------------------------------------------------------------------------------
def redact_raw(value: bytes) -> bytes:
    """Raw record bytes with every secret value replaced by ``"[REDACTED]"`` (see the
    module doc). Bytes without secrets are returned unchanged."""
    data = bytes(value)
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        pass  # not JSON for orjson: maybe only deeper than its limit (see _scan)
    else:
        if not _needs_redaction(parsed) and parse_holds_all(data, parsed):
            return data
    spans = _scan(data)
    if spans is None:
        spans = _fallback_spans(data)
    return _apply(data, spans)


class _NamedTwice(ValueError):
    pass


def _no_name_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _NamedTwice
    return out


def parse_holds_all(raw: bytes, parsed: Any) -> bool:
    """Whether `parsed`, orjson's parse of `raw`, holds every value `raw` holds, so that
    what holds no secret in `parsed` holds none in `raw`: true when `raw` is exactly what
    orjson writes for `parsed` (the records this project writes: one encode and a
    compare), or else when no object in `raw` names a member twice (its names compared
    unescaped). A parser keeps one value of a name given twice — orjson the last — and a
    check of the parse never sees the others."""
    try:
        if orjson.dumps(parsed) == raw:
            return True
    except orjson.JSONEncodeError:
        return False
    try:
        json.loads(raw, object_pairs_hook=_no_name_twice)
    except (ValueError, RecursionError):  # a name twice, or what orjson reads and json not
        return False
    return True


def _apply(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    if not spans:
        return data
    spans.sort()
    parts: list[bytes] = []
    pos = 0
    for start, end in spans:
        if end <= pos:
            continue  # inside a span already taken
        start = max(start, pos)
        parts += [data[pos:start], _REDACTED_JSON]
        pos = end
    parts.append(data[pos:])
    return b"".join(parts)


_WS = re.compile(rb"[ \t\n\r]*+")


def _skip(data: bytes, pos: int) -> int:
    """The position after the JSON whitespace at `pos`."""
    m = _WS.match(data, pos)
    return m.end() if m is not None else pos


_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+"')
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?+[0-9]++)?+")
_LITERAL = re.compile(rb"true|false|null")

_VALUE, _KEY, _AFTER = 0, 1, 2
_OPEN_OBJECT, _OPEN_ARRAY = 0x7B, 0x5B  # { [   (their closers are +2: } ])
_OPENERS = frozenset((_OPEN_OBJECT, _OPEN_ARRAY))
_QUOTE, _COMMA, _COLON = 0x22, 0x2C, 0x3A
_NUMBER_START = frozenset(b"-0123456789")
_LITERAL_START = frozenset(b"tfn")
_NULL_START = 0x6E


def _scan(data: bytes) -> list[tuple[int, int]] | None:
    """The spans to replace in `data`, or None when `data` is not one JSON value.

    An iterative tokenizer (an explicit container stack, no recursion limit) with the
    grammar of RFC 8259; UTF-8 validity is not checked (the bytes are kept as they are)."""
    n = len(data)
    ws = _skip
    spans: list[tuple[int, int]] = []
    stack = bytearray()
    secret_depth = -1  # len(stack) where the value of a secret member started, or -1
    secret_start = 0
    pending = False  # the next value is a secret member's
    pos = ws(data, 0)
    state = _VALUE
    while True:
        if state == _VALUE:
            if pos >= n:
                return None
            c = data[pos]
            if pending:
                pending = False
                if c != _NULL_START:
                    secret_depth, secret_start = len(stack), pos
            if c in _OPENERS:
                stack.append(c)
                pos = ws(data, pos + 1)
                if pos < n and data[pos] == c + 2:
                    stack.pop()
                    pos += 1
                    state = _AFTER
                else:
                    state = _KEY if c == _OPEN_OBJECT else _VALUE
                continue
            if c == _QUOTE:
                m = _STRING.match(data, pos)
            elif c in _NUMBER_START:
                m = _NUMBER.match(data, pos)
            elif c in _LITERAL_START:
                m = _LITERAL.match(data, pos)
            else:
                return None
            if m is None:
                return None
            end = m.end()
            if secret_depth < 0 and len(stack) > MAX_DEPTH and c not in _LITERAL_START:
                spans.append((pos, end))
            pos = end
            state = _AFTER
        elif state == _KEY:
            if pos >= n or data[pos] != _QUOTE:
                return None
            m = _STRING.match(data, pos)
            if m is None:
                return None
            if secret_depth < 0:
                if len(stack) > MAX_DEPTH:
                    spans.append((pos, m.end()))
                elif _is_secret_raw(data[pos + 1 : m.end() - 1]):
                    pending = True
            pos = ws(data, m.end())
            if pos >= n or data[pos] != _COLON:
                return None
            pos = ws(data, pos + 1)
            state = _VALUE
        else:  # _AFTER: a value ended at pos
            if secret_depth == len(stack):
                spans.append((secret_start, pos))
                secret_depth = -1
            pos = ws(data, pos)
            if not stack:
                return spans if pos == n else None
            if pos >= n:
                return None
            c = data[pos]
            if c == _COMMA:
                pos = ws(data, pos + 1)
                state = _KEY if stack[-1] == _OPEN_OBJECT else _VALUE
            elif c == stack[-1] + 2:
                stack.pop()
                pos += 1
            else:
                return None


# -- not JSON: the fallback -------------------------------------------------------------
#: a string, possibly cut off by the end of the input (group 1: the closing quote)
_LOOSE_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+("|\\?\Z)', re.DOTALL)
_SCALAR = re.compile(rb"[^,}\]]*+")
_STRUCTURE = re.compile(rb'["{}\[\]]')
_NULL = re.compile(rb"null(?=[\s,}\]]|\Z)")


#: a quoted name and a colon, wherever it starts: the second pass of the fallback, for
#: names the left-to-right string scan did not see as strings (quotes out of step)
_ANY_MEMBER = re.compile(rb'"((?:[^"\\]++|\\.)*+)"\s*+:', re.DOTALL)


def _value_end(data: bytes, pos: int) -> int | None:
    """Where the value starting at `pos` ends, or None when the input ends inside it
    (or it cannot be bounded): the caller then takes everything to the end."""
    n = len(data)
    c = data[pos]
    if c == _QUOTE:
        m = _LOOSE_STRING.match(data, pos)
        return m.end() if m is not None and m.group(1) == b'"' else None
    if c in _OPENERS:
        depth, i = 0, pos
        while (found := _STRUCTURE.search(data, i)) is not None:
            i = found.start()
            b = data[i]
            if b == _QUOTE:
                m = _LOOSE_STRING.match(data, i)
                if m is None or m.group(1) != b'"':
                    return None
                i = m.end()
                continue
            depth += 1 if b in _OPENERS else -1
            i += 1
            if depth == 0:
                return i
        return None
    m = _SCALAR.match(data, pos)
    end = m.end() if m is not None else n
    while end > pos and data[end - 1 : end].isspace():
        end -= 1
    return end


def _member_value(data: bytes, colon: int, spans: list[tuple[int, int]]) -> None:
    """Blank the value after the colon at `colon` (fail closed when it is unbounded)."""
    n = len(data)
    pos = _skip(data, colon + 1)
    if pos >= n or _NULL.match(data, pos):
        return
    end = _value_end(data, pos)
    if end is None:
        spans.append((pos, n))
    elif end > pos:
        spans.append((pos, end))


#: a string in garbage (alignment as a left-to-right scan finds it), possibly cut off by
#: the end; then, looked ahead at: a colon (group 2: a member name) or a character that
#: cannot follow a value (group 3)
_GARBAGE_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:(")(?=\s*+(?:(:)|([^,\]}\s])))?)?', re.DOTALL)


def _fallback_spans(data: bytes) -> list[tuple[int, int]]:
    """Spans to blank in bytes that are not JSON."""
    n = len(data)
    spans: list[tuple[int, int]] = []
    handled: set[int] = set()
    # 1. the strings of the input, in order: a secret name followed by a colon is a
    #    member whose value goes; one followed by what cannot follow a value takes the rest
    resume = 0
    for m in _GARBAGE_STRING.finditer(data):
        start = m.start()
        if start < resume:
            continue  # inside a value blanked already
        if m.group(1) is None:
            break  # a string cut off by the end: nothing follows it
        if m.group(2) is None and m.group(3) is None:
            continue  # followed by , ] } or the end: a value, or nothing follows
        if not _is_secret_raw(data[start + 1 : m.end() - 1]):
            continue
        if m.group(2) is None:
            spans.append((m.end(), n))  # a secret name where no parse can bound it
            break
        handled.add(start)
        before = len(spans)
        _member_value(data, m.start(2), spans)
        if len(spans) > before:
            resume = spans[-1][1]
    # 2. names the string scan may have missed (it lost track of the quotes in garbage):
    #    the first one not already handled takes everything after it
    for m in _ANY_MEMBER.finditer(data):
        if m.start() in handled or not _is_secret_raw(m.group(1)):
            continue
        if any(s <= m.start() < e for s, e in spans):
            continue
        spans.append((m.end(), n))
        break
    return spans


__all__ = [
    "MAX_DEPTH",
    "REDACTED",
    "SECRET_KEYS",
    "is_secret_key",
    "normalise_key",
    "parse_holds_all",
    "redact_event_dict",
    "redact_raw",
]
