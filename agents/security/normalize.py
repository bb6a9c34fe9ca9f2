"""The text that policy patterns are matched against: what a hostile sender cannot hide.

A blocked pattern such as ``(?i)password`` is written for the text a *reader* sees. A sender
who wants a blocked word to reach its recipient while slipping past the pattern changes the
code points but not what they look like, or hides the word behind characters nobody sees.
`normalize` undoes the cheap tricks, each of which is an attack we test:

* **invisible characters inside the word**: ``pass<U+200B>word`` (zero-width space),
  ``pass<U+00AD>word`` (soft hyphen), word joiners, variation selectors, tag characters...
  Every *Default_Ignorable_Code_Point* is removed: by definition a renderer shows nothing
  for it, so removing it changes nothing a reader sees (`DEFAULT_IGNORABLE_RANGES`).
* **bidi controls**: ``<U+202E>drowssap`` and friends are default-ignorable too, so they go
  with the above. (Reordering is a display effect: the logical order is kept, and a policy
  that wants such text denied outright uses `forbidden_controls` on the raw text.)
* **control characters**: ``pass<NUL>word``. Every C0/C1 control (category Cc) except
  tab, line feed and carriage return is removed: they have no glyph either (the white
  space ones among them, VT, FF and NEL, included: many renderers show nothing for them,
  and a pattern's ``\\s*`` matches across where they were).
* **other format controls that render as nothing**: the Egyptian hieroglyph format
  controls U+13430..1343F (joiners and insertion marks between hieroglyphs; U+13439..1343F
  are Unicode 15's, unassigned in the 14.0 data) are not default-ignorable, but outside
  hieroglyphic text they are as invisible as a zero-width joiner (`INVISIBLE_FORMAT_RANGES`).
* **white space that is not ASCII**: ``password<U+2028>: x``. NFKC turns the no-break and
  typographic spaces (U+00A0, U+2000..200A, U+202F, U+205F, U+3000) into a space; the
  rest of Unicode's White_Space outside ASCII and the controls survives it: U+1680 OGHAM
  SPACE MARK becomes a space, U+2028 LINE SEPARATOR and U+2029 PARAGRAPH SEPARATOR a line
  feed (`WHITE_SPACE_MAP`). RE2's ``\\s`` is ASCII: without this a pattern's ``\\s*``
  would stop at them, where a reader sees a space or a line break.
* **compatibility forms**: full-width letters (U+FF50 FULLWIDTH LATIN SMALL LETTER P...),
  mathematical bold and italic letters, ligatures (U+FB01 ``fi``), circled and superscript
  letters... Unicode NFKC folds them to the plain letters.
* **homoglyphs**: ``password`` with a Cyrillic er (U+0440) and a (U+0430) for ``p`` and
  ``a``, Greek capitals (U+03A1 RHO for ``P``), Cherokee, Latin dotless i (U+0131)... With
  ``fold_confusables`` (the default) every *non-ASCII* character that Unicode's confusables
  data (UTS #39) maps to printable ASCII is replaced by that ASCII text. The data comes from
  the `disarm` package: its TR39 fold toward Latin, which also sends a few Latin letters
  with a stroke or hook to the bare letter (U+00E7 c-cedilla to ``c``). We use it as a
  plain character → string table (`confusable_table`, ~1,100 entries).

What is *not* normalised, on purpose:

* **ASCII is never touched** (except that its control characters go). The UTS #39 data also
  maps ASCII to ASCII (``|`` → ``l``, ``"`` → ``''``, and its skeleton ``m`` → ``rn``), which
  would break patterns written for ordinary text; the fold is for look-alikes of ASCII, not
  ASCII itself. For the same reason case is kept: ``(?i)`` is the pattern's business.
* **leetspeak and deliberate misspelling** (``p4ssw0rd``, ``passw0rd``) and **spacing out**
  (``p a s s``, ``p.a.s.s``): the text reads differently to a human too, so the sender has
  changed the message, not hidden it, and undoing it would be guessing (``p a s s`` is also
  how ordinary text looks). A policy that cares writes the pattern for it
  (``p\\W*a\\W*s\\W*s``).
* **combining marks** (``p`` + U+0308 COMBINING DIAERESIS, "zalgo") stay: stripping them
  would make every accented letter of ordinary text match its bare letter; NFKC composes
  what it can.
* **runs of white space** are not collapsed (nor is white space removed: it separates
  what a reader sees apart): ``\\s+`` in the pattern is the tool for that.
* **other scripts' words** are not transliterated: a Russian word stays Cyrillic apart
  from the letters that look Latin. Folding is visual, so wholly Cyrillic or Greek text can
  come out as a mix (Moscow in Cyrillic becomes ``Mockba``): a pattern written in those
  scripts should be matched against ``normalize(text, fold_confusables=False)``.

The normalised text is for matching only: it is never forwarded in place of the message.

Everything here is pure (no I/O) and cheap on the common case: ASCII text without control
characters is returned as the same object after two C-level checks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from agentstream.schemas.messages import AgentMessage

#: Default_Ignorable_Code_Point, inclusive ranges, as in DerivedCoreProperties.txt of Unicode
#: 14.0.0: the version of Python 3.11's `unicodedata`, so that NFKC and this table agree.
#: (Reproduce: ``perl -MUnicode::UCD=prop_invlist -e 'print join " ",
#: prop_invlist("Default_Ignorable_Code_Point")'`` with Perl 5.36, whose UCD is 14.0.0.) It
#: includes the unassigned code points the property reserves (U+2065, U+FFF0..FFF8, most of
#: U+E0000..E0FFF), which a later Unicode version may assign as more invisible characters.
DEFAULT_IGNORABLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),  # SOFT HYPHEN
    (0x034F, 0x034F),  # COMBINING GRAPHEME JOINER
    (0x061C, 0x061C),  # ARABIC LETTER MARK
    (0x115F, 0x1160),  # HANGUL CHOSEONG FILLER, HANGUL JUNGSEONG FILLER
    (0x17B4, 0x17B5),  # KHMER VOWEL INHERENT AQ, AA
    (0x180B, 0x180F),  # MONGOLIAN FREE VARIATION SELECTORS 1-4, VOWEL SEPARATOR
    (0x200B, 0x200F),  # ZERO WIDTH SPACE, ZWNJ, ZWJ, LEFT-TO-RIGHT MARK, RIGHT-TO-LEFT MARK
    (0x202A, 0x202E),  # bidi embeddings and overrides (LRE, RLE, PDF, LRO, RLO)
    (0x2060, 0x206F),  # WORD JOINER, invisible operators, bidi isolates (U+2066..2069), ...
    (0x3164, 0x3164),  # HANGUL FILLER
    (0xFE00, 0xFE0F),  # VARIATION SELECTORS 1-16
    (0xFEFF, 0xFEFF),  # ZERO WIDTH NO-BREAK SPACE (byte order mark)
    (0xFFA0, 0xFFA0),  # HALFWIDTH HANGUL FILLER
    (0xFFF0, 0xFFF8),  # reserved (unassigned)
    (0x1BCA0, 0x1BCA3),  # SHORTHAND FORMAT LETTER OVERLAP ... STEP
    (0x1D173, 0x1D17A),  # MUSICAL SYMBOL BEGIN BEAM ... END PHRASE
    (0xE0000, 0xE0FFF),  # TAG characters, VARIATION SELECTORS 17-256, reserved
)
UNICODE_VERSION_OF_TABLE = "14.0.0"

#: Format controls (category Cf) that are not default-ignorable yet show nothing where a
#: hostile sender puts them: removed like the default-ignorables. The Egyptian hieroglyph
#: format controls: U+13430..13438 in Unicode 12, U+13439..1343F added in Unicode 15
#: (reserved in the 14.0 data this Python has; removed now so that a newer one changes
#: nothing). The block's combining modifiers (U+13440, U+13447..13455) are marks and stay.
INVISIBLE_FORMAT_RANGES: tuple[tuple[int, int], ...] = ((0x13430, 0x1343F),)

#: Unicode White_Space that NFKC leaves outside ASCII and is not a control (the controls
#: VT, FF and NEL are removed with the others): to the ASCII space or line feed a reader
#: sees, so that a pattern's ``\s`` (ASCII in RE2) matches there
WHITE_SPACE_MAP: Mapping[int, str] = MappingProxyType({0x1680: " ", 0x2028: "\n", 0x2029: "\n"})

#: C0 and C1 controls (category Cc) except TAB, LF, CR: they are how text is laid out
_CONTROL_RANGES: tuple[tuple[int, int], ...] = (
    (0x00, 0x08),
    (0x0B, 0x0C),
    (0x0E, 0x1F),
    (0x7F, 0x9F),
)

#: forbidden_controls reports these, whatever the policy patterns: characters that make
#: text display in another order than the one it is matched in, and NUL, which truncates
#: the text for C-string consumers downstream.
FORBIDDEN_CONTROLS: Mapping[str, str] = MappingProxyType(
    {
        "\x00": "U+0000 NUL",
        **{
            chr(cp): f"U+{cp:04X} {unicodedata.name(chr(cp))}"
            for cp in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
        },
    }
)
#: forbidden_controls returns at most this many names
MAX_FORBIDDEN_REPORTED = 10

#: a normalisation pass can expose more work for the next (a fold before a combining mark
#: that then composes); it converges in two passes in practice, this is only a bound.
_MAX_PASSES = 8


def _char_class(ranges: Sequence[tuple[int, int]]) -> str:
    parts = []
    for start, end in ranges:
        parts.append(f"\\U{start:08x}" if start == end else f"\\U{start:08x}-\\U{end:08x}")
    return "[" + "".join(parts) + "]"


_STRIP_RE = re.compile(
    _char_class((*_CONTROL_RANGES, *DEFAULT_IGNORABLE_RANGES, *INVISIBLE_FORMAT_RANGES)) + "+"
)
_SPACE_RE = re.compile(_char_class([(cp, cp) for cp in WHITE_SPACE_MAP]))
_SPACE_TABLE = dict(WHITE_SPACE_MAP)
_ASTRAL_RE = re.compile("[\U00010000-\U0010ffff]")
_ASCII_CONTROL_BYTES = bytes(
    cp for start, end in _CONTROL_RANGES for cp in range(start, end + 1) if cp < 0x80
)


# -- confusables --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Folder:
    #: ord(non-ASCII character) -> printable ASCII text, for str.translate (a plain dict:
    #: translate looks every character up, and a read-only proxy costs 10% more)
    table: dict[int, str]
    #: finds a BMP character that has an entry. The astral ones are looked for apart: a
    #: character class listing them is a linear list of ranges that `re` tries on every
    #: character of the text (10 times slower); one range for "any astral" is not.
    bmp: re.Pattern[str]
    astral: frozenset[str]
    #: the few astral blocks that hold them (gaps under 128 code points bridged)
    astral_blocks: re.Pattern[str]
    source: str

    def fold(self, text: str) -> str:
        # One C-level scan decides; then str.translate, linear whatever the text. (A
        # re.sub with a callback per run of look-alikes is faster on sparse text, but a
        # sender controls the density: on Russian prose it was already twice as slow.)
        if self.bmp.search(text) is None:
            if _ASTRAL_RE.search(text) is None:
                return text
            candidates = self.astral_blocks.findall(text)  # not emoji: those blocks have none
            if self.astral.isdisjoint(candidates):
                return text
        return text.translate(self.table)


def _ranges(code_points: Iterable[int], gap: int) -> list[tuple[int, int]]:
    """Inclusive ranges covering `code_points`, joining neighbours at most `gap` apart."""
    ranges: list[tuple[int, int]] = []
    for cp in sorted(code_points):
        if ranges and cp - ranges[-1][1] <= gap:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    return ranges


def _candidate_code_points() -> list[str]:
    """Every character the fold can meet: it runs after NFKC, so only NFKC-stable ones.

    The BMP and plane 1 hold every confusable with an ASCII prototype (planes 2 and 3 are
    CJK ideographs, which have none); surrogates and private use have no data.
    """
    chars = []
    for cp in range(0x80, 0x20000):
        if 0xD800 <= cp <= 0xF8FF:
            continue
        char = chr(cp)
        if unicodedata.normalize("NFKC", char) == char:
            chars.append(char)
    return chars


@functools.cache
def _folder() -> _Folder:
    # Imported here: 30 ms, paid by the first non-ASCII text folded, not by every process
    # that imports the policy engine (the CLI).
    import disarm

    def fold(text: str) -> str:
        return disarm.normalize_confusables(text, target_script="latin")

    chars = _candidate_code_points()
    # One call for all of them (10 ms rather than 80 ms for one call each): the fold is per
    # character, and a line feed is neither a confusable nor a prototype, so the lines
    # come back one per character. Should a release break that, fall back.
    folded = fold("\n".join(chars)).split("\n")
    if len(folded) != len(chars):  # pragma: no cover - depends on the library's data
        folded = [fold(char) for char in chars]
    table = {
        ord(char): target
        for char, target in zip(chars, folded, strict=True)
        if target and target != char and target.isascii() and target.isprintable()
    }
    return _Folder(
        table=table,
        bmp=re.compile(_char_class(_ranges((cp for cp in table if cp <= 0xFFFF), gap=1))),
        astral=frozenset(chr(cp) for cp in table if cp > 0xFFFF),
        astral_blocks=re.compile(_char_class(_ranges((cp for cp in table if cp > 0xFFFF), 128))),
        source=f"disarm {disarm.__version__} (Unicode confusables {disarm.CONFUSABLES_VERSION})",
    )


def confusable_table() -> Mapping[str, str]:
    """The fold `normalize` applies: non-ASCII character -> printable ASCII text (~1,100)."""
    return MappingProxyType({chr(cp): text for cp, text in _folder().table.items()})


def confusables_source() -> str:
    """Where the fold's data comes from, with its version (for logs and `policy list`).

    The first call builds the table (about 50 ms): a worker calls this at start so that its
    first non-ASCII message does not pay for it.
    """
    return _folder().source


# -- normalize ----------------------------------------------------------------------------


def normalize(text: str, *, fold_confusables: bool = True) -> str:
    """The text policy patterns are matched against (see the module docstring).

    Idempotent: ``normalize(normalize(t)) == normalize(t)``. Pure ASCII text without control
    characters is returned as is (the same object).
    """
    if text.isascii():
        # Neither NFKC nor the fold changes ASCII, and no ignorable is ASCII: only controls.
        if text.isprintable():
            return text
        # Text with line breaks: bytes.translate is 10 times faster than a regex search.
        data = text.encode("ascii")
        kept = data.translate(None, _ASCII_CONTROL_BYTES)
        return text if len(kept) == len(data) else kept.decode("ascii")
    fold = _folder().fold if fold_confusables else None
    current = text
    if _SPACE_RE.search(current) is not None:
        # NFKC and the fold write none of them: once is enough
        current = current.translate(_SPACE_TABLE)
    for _ in range(_MAX_PASSES):
        if _STRIP_RE.search(current) is not None:
            current = _STRIP_RE.sub("", current)
        # NFKC creates no ignorable and no control (checked over every code point), so the
        # strip needs no second run: without the fold, this is final.
        current = unicodedata.normalize("NFKC", current)
        if fold is None:
            return current
        folded = fold(current)
        # The fold writes printable ASCII and leaves nothing it could fold again, so its
        # output is final when it is still NFKC. It may not be: an ASCII letter put before a
        # combining mark composes with it (Cyrillic es + cedilla -> "c" + cedilla -> c-cedilla,
        # which folds to "c"): then another pass.
        if folded is current or unicodedata.is_normalized("NFKC", folded):
            return folded
        current = folded
    return current  # pragma: no cover - converges in two passes; this is only a bound


# -- forbidden controls -------------------------------------------------------------------


def forbidden_controls(text: str) -> list[str]:
    """Names of the bidi embeddings/overrides/isolates and NULs in the raw `text`.

    E.g. ``["U+202E RIGHT-TO-LEFT OVERRIDE", "U+0000 NUL"]``: deduplicated, in order of first
    appearance, at most `MAX_FORBIDDEN_REPORTED`.
    """
    if text.isascii():
        return [FORBIDDEN_CONTROLS["\x00"]] if "\x00" in text else []
    # One C-level find per candidate (10 of them) rather than a Python loop over matches:
    # a text made of 50,000 overrides costs the same as one with a single override.
    found = sorted(
        (index, name)
        for char, name in FORBIDDEN_CONTROLS.items()
        if (index := text.find(char)) >= 0
    )
    return [name for _, name in found[:MAX_FORBIDDEN_REPORTED]]


# -- fields of a message ------------------------------------------------------------------

#: the names `scanned_fields` accepts, in the order it returns them
SCANNABLE_FIELDS = ("content", "content_type", "ids", "metadata")
_ID_FIELDS = ("message_id", "sender_id", "recipient_id", "sender_role", "security_level")
#: metadata keys shown as ``.key`` in a path; any other key is shown JSON-quoted (ASCII)
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_MAX_KEY_SHOWN = 64


class ScanLimitExceeded(ValueError):
    """Metadata nests deeper or holds more items than `scanned_fields` may walk.

    Raised rather than scanning part of it: what is not scanned must not be allowed by
    default (a blocked word at depth 17 would otherwise pass). The caller denies the
    message. `AgentMessage` validation refuses such metadata with the same bounds, so this
    only fires for a message built without validation.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def scanned_fields(
    message: AgentMessage,
    fields: Collection[str],
    *,
    fold_confusables: bool,
    max_depth: int = 16,
    max_items: int = 10_000,
) -> list[tuple[str, str]]:
    """Every sender-controlled text of `message` in `fields`, as ``(path, normalized text)``.

    `fields` names groups, returned in this order whatever the order given:

    * ``"content"``: ``("content", ...)``
    * ``"content_type"``: ``("content_type", ...)``
    * ``"ids"``: ``message_id``, ``sender_id``, ``recipient_id``, ``sender_role``,
      ``security_level``
    * ``"metadata"``: every key and every scalar value, depth first in document order. A
      value's path is ``metadata.a.b[2]``; a key's is its value's path plus ``#key``
      (``metadata.a.b#key``). A key that is not ``[A-Za-z0-9_-]{1,64}`` is shown
      JSON-quoted in ASCII, cut at 64 characters (``metadata["x y"]``), so that a path is
      safe to put in a log line or a rejection reason. Numbers and booleans are scanned as
      their JSON text (``true``, ``1.5``), ``None`` is skipped. A path spells its keys
      out: where it is shown after a pattern matched a key, `hide_keys` renames it.

    `max_depth` and `max_items` bound the walk as `AgentMessage` validation does (the
    metadata dict is level 1; every dict value and list element is an item); beyond them
    `ScanLimitExceeded` is raised. Raises ValueError for an unknown field name.
    """
    unknown = set(fields) - set(SCANNABLE_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown field(s) {sorted(unknown)}: expected some of {list(SCANNABLE_FIELDS)}"
        )

    def norm(text: str) -> str:
        return normalize(text, fold_confusables=fold_confusables)

    scanned: list[tuple[str, str]] = []
    if "content" in fields:
        scanned.append(("content", norm(message.content)))
    if "content_type" in fields:
        scanned.append(("content_type", norm(message.content_type)))
    if "ids" in fields:
        scanned.extend((name, norm(getattr(message, name))) for name in _ID_FIELDS)
    if "metadata" in fields:
        scanned.extend(_metadata_texts(message.metadata, norm, max_depth, max_items))
    return scanned


def _scalar_text(value: Any, path: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool | float):
        return json.dumps(value)  # true/false; NaN and Infinity as Python's json writes them
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError as exc:  # over sys.get_int_max_str_digits(): cannot be shown
            raise ScanLimitExceeded(path, "integer too large to scan") from exc
    # Not a JSON type (metadata built in code, not decoded): scan what it prints as.
    return str(value)


def _key_text(key: Any, path: str) -> str:
    # Keys decoded from JSON are strings; one set in code may be a number, even None.
    if isinstance(key, str):
        return key
    text = _scalar_text(key, path)
    return "null" if text is None else text


def _key_path(key: Any, path: str) -> str:
    text = _key_text(key, path)
    if _PLAIN_KEY_RE.fullmatch(text):
        return f"{path}.{text}"
    shown = text if len(text) <= _MAX_KEY_SHOWN else text[: _MAX_KEY_SHOWN - 3] + "..."
    return f"{path}[{json.dumps(shown, ensure_ascii=True)}]"


def _metadata_texts(
    metadata: Any, norm: Callable[[str], str], max_depth: int, max_items: int
) -> list[tuple[str, str]]:
    scanned: list[tuple[str, str]] = []
    # Iterative, depth first: a hostile tree cannot exhaust the interpreter's stack. Each
    # entry is (path, value, depth of the value, is a key).
    stack: list[tuple[str, Any, int, bool]] = [("metadata", metadata, 1, False)]
    items = 0
    while stack:
        path, node, depth, is_key = stack.pop()
        if is_key:
            scanned.append((path, norm(node)))
            continue
        if isinstance(node, Mapping | list | tuple):
            if depth > max_depth:
                raise ScanLimitExceeded(path, f"nested deeper than {max_depth} levels")
            items += len(node)
            if items > max_items:
                raise ScanLimitExceeded(path, f"holds more than {max_items} keys and values")
            children: list[tuple[str, Any, int, bool]] = []
            if isinstance(node, Mapping):
                for key, value in node.items():
                    child_path = _key_path(key, path)
                    children.append((f"{child_path}#key", _key_text(key, path), depth, True))
                    children.append((child_path, value, depth + 1, False))
            else:
                children.extend(
                    (f"{path}[{i}]", value, depth + 1, False) for i, value in enumerate(node)
                )
            stack.extend(reversed(children))
            continue
        text = _scalar_text(node, path)
        if text is not None:
            scanned.append((path, norm(text)))
    return scanned


def hide_keys(metadata: Any, keys: Collection[str]) -> dict[str, str]:
    """{path: path to show instead} for the metadata paths that would repeat a key of
    `keys` (paths of key texts, as `scanned_fields` names them: ``metadata.a.b#key``).

    Such a key (a blocked pattern matched it) is named by its position among its parent's
    keys, from 0, in document order: ``metadata.a{1}`` for the second key of ``a``; its own
    key text's path becomes ``metadata.a{1}#key``, and every path under it starts with the
    positional name (``metadata.a{1}.note``). A path of `scanned_fields` spells the key
    out, so a secret a pattern caught in a key would otherwise be repeated, unmasked,
    wherever the path is shown: the masked metadata's keys, a rejection reason, the
    signed decision. Paths that need no change are not in the result.

    Walks `metadata` like `scanned_fields` (iteratively; bounded by the schema's limits
    on metadata), only when some key matched.
    """
    hidden = set(keys)
    shown: dict[str, str] = {}
    # (path as scanned, path shown, node): the shown path differs once a key on the way
    # down was hidden
    stack: list[tuple[str, str, Any]] = [("metadata", "metadata", metadata)]
    while stack:
        path, seen, node = stack.pop()
        if isinstance(node, Mapping):
            for position, (key, value) in enumerate(node.items()):
                child = _key_path(key, path)
                if f"{child}#key" in hidden:
                    child_seen = f"{seen}{{{position}}}"
                elif seen != path:
                    child_seen = _key_path(key, seen)
                else:
                    child_seen = child
                if child_seen != child:
                    shown[child] = child_seen
                    shown[f"{child}#key"] = f"{child_seen}#key"
                stack.append((child, child_seen, value))
        elif isinstance(node, list | tuple):
            for index, value in enumerate(node):
                child, child_seen = f"{path}[{index}]", f"{seen}[{index}]"
                if child_seen != child:
                    shown[child] = child_seen
                stack.append((child, child_seen, value))
    return shown


# -- spans --------------------------------------------------------------------------------


def mask_spans(text: str, spans: Sequence[tuple[int, int]], mode: Literal["mask", "hash"]) -> str:
    """Replace each ``[start, end)`` character span of `text` by a marker.

    Overlapping and touching spans are merged first (one marker for the union); empty
    spans are ignored. ``mask`` writes ``[MASKED]``; ``hash`` writes
    ``[sha256:<first 12 hex digits of the SHA-256 of the span's UTF-8>]``, which lets an
    auditor see that two masked spans were equal, but is no secrecy for a short or
    guessable span (a 4-digit PIN is found by trying them all). Raises ValueError for a
    span outside the text or with end < start.
    """
    if mode not in ("mask", "hash"):
        raise ValueError(f"mode must be 'mask' or 'hash', not {mode!r}")
    merged = _merge(spans, len(text))
    if not merged:
        return text
    pieces: list[str] = []
    position = 0
    for start, end in merged:
        pieces.append(text[position:start])
        if mode == "mask":
            pieces.append("[MASKED]")
        else:
            digest = hashlib.sha256(text[start:end].encode("utf-8", "surrogatepass"))
            pieces.append(f"[sha256:{digest.hexdigest()[:12]}]")
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _merge(spans: Sequence[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    for start, end in spans:
        if not 0 <= start <= end <= length:
            raise ValueError(f"span ({start}, {end}) is not within a text of length {length}")
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for span in spans if span[0] < span[1]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def byte_spans_to_char_spans(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Convert ``[start, end)`` offsets into ``text.encode()`` (what RE2 reports when it
    matches the UTF-8 bytes) to offsets into `text`, in the same order.

    Raises ValueError for an offset outside the bytes, inside a character's UTF-8 sequence,
    or a span with end < start.
    """
    if text.isascii():  # one byte per character
        _merge(spans, len(text))  # validates
        return [(start, end) for start, end in spans]
    data = text.encode("utf-8", "surrogatepass")
    for start, end in spans:
        if not 0 <= start <= end <= len(data):
            raise ValueError(f"span ({start}, {end}) is not within {len(data)} bytes")
    # Walk the distinct offsets in order, decoding only the bytes between neighbours: linear
    # in the text whatever the number of spans.
    to_char: dict[int, int] = {}
    byte_pos = char_pos = 0
    for offset in sorted({offset for span in spans for offset in span}):
        try:
            char_pos += len(data[byte_pos:offset].decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"byte offset {offset} is inside a UTF-8 character") from exc
        to_char[offset] = char_pos
        byte_pos = offset
    return [(to_char[start], to_char[end]) for start, end in spans]
