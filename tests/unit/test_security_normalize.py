"""The text policy patterns see: a blocked word hidden by a hostile sender is still found.

Attack strings are written with escapes: the point of most of them is that they look like
plain "password" on screen.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from agentstream.agents.security.normalize import (
    DEFAULT_IGNORABLE_RANGES,
    FORBIDDEN_CONTROLS,
    ScanLimitExceeded,
    byte_spans_to_char_spans,
    confusable_table,
    confusables_source,
    forbidden_controls,
    hide_keys,
    mask_spans,
    normalize,
    scanned_fields,
)
from agentstream.schemas.messages import AgentMessage

PASSWORD = re.compile("password")

ATTACKS = {
    "zero-width space": "my pass\u200bword is",
    "soft hyphen": "my pass\u00adword is",
    "word joiner and zero-width joiners": "my p\u2060a\u200cs\u200ds\ufeffword is",
    "full-width letters": "my \uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44 is",
    "cyrillic er and a": "my \u0440\u0430ssword is",
    "mathematical bold": "my \U0001d429\U0001d41a\U0001d42c\U0001d42c\U0001d430\U0001d428"
    "\U0001d42b\U0001d41d is",
    "NUL": "my pass\x00word is",
    "other C0 and C1 controls": "my p\x1ba\x07ss\x85wo\x7frd is",
    "bidi override": "my \u202epass\u202cword is",
    "bidi isolates": "my pass\u2066word\u2069 is",
    "variation selector and tag characters": "my pass\ufe0fwo\U000e0072rd is",
    # Egyptian hieroglyph format controls: Cf, not default-ignorable, invisible here (the
    # last one is Unicode 15's, unassigned in Python 3.11's data)
    "egyptian hieroglyph format controls": "my pa\U00013430ss\U00013438wo\U0001343frd is",
    "all of them at once": "my \uff50\u200b\u0430\u00ad\u0455\x00s\u202e\U0001d430ord is",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_hidden_blocked_word_is_found(name: str) -> None:
    raw = ATTACKS[name]
    assert not PASSWORD.search(raw), "the attack must defeat the plain pattern"
    assert PASSWORD.search(normalize(raw))
    assert normalize(raw) == "my password is"


#: Unicode's White_Space (PropList.txt, the same in 14.0 and 15.1)
WHITE_SPACE = [
    *range(0x09, 0x0E),
    0x20,
    0x85,
    0xA0,
    0x1680,
    *range(0x2000, 0x200B),
    0x2028,
    0x2029,
    0x202F,
    0x205F,
    0x3000,
]


@pytest.mark.parametrize("fold", [True, False])
def test_unicode_white_space_is_what_re2_calls_white_space(fold: bool) -> None:
    # RE2's \s is [\t\n\f\r ]: a separator a reader sees must reach it as one of those
    # (or, for the controls VT, FF and NEL, be removed like every other control)
    pattern = re2.compile(r"(?i)password\s*[:=]")
    for cp in WHITE_SPACE:
        raw = f"password{chr(cp)}: x"
        text = normalize(raw, fold_confusables=fold)
        assert text.isascii(), hex(cp)
        assert pattern.search(text.encode()) is not None, hex(cp)
    assert normalize("a\u2028b\u2029c\u1680d", fold_confusables=fold) == "a\nb\nc d"
    assert normalize("a\u3000b\u00a0c", fold_confusables=fold) == "a b c"  # NFKC's part


def test_look_alike_capitals_are_found_case_insensitively() -> None:
    # Greek capital rho and Cyrillic capital a: the fold keeps case, (?i) does the rest.
    raw = "MY \u03a1\u0410SSWORD IS"
    assert not re.search("(?i)password", raw)
    assert normalize(raw) == "MY PASSWORD IS"
    assert re.search("(?i)password", normalize(raw))


def test_the_attacks_also_beat_re2_until_normalised() -> None:
    # What the policy engine uses: RE2 over the UTF-8 bytes.
    pattern = re2.compile("(?i)password")
    for raw in ATTACKS.values():
        assert pattern.search(raw.encode()) is None
        assert pattern.search(normalize(raw).encode()) is not None


def test_the_exact_results() -> None:
    assert normalize("pass\x00word") == "password"
    assert normalize("pass\u200bword") == "password"
    assert normalize("pass\u00adword") == "password"
    assert normalize("\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44") == "password"
    assert normalize("\u0440\u0430ssword") == "password"
    assert normalize("\u202epassword\u202c") == "password"
    assert normalize("\ufb01le") == "file"  # ligature
    assert normalize("a\u00a0b") == "a b"  # no-break space


def test_without_the_fold_homoglyphs_stay_and_the_rest_is_still_normalised() -> None:
    assert normalize("\u0440\u0430ssword", fold_confusables=False) == "\u0440\u0430ssword"
    assert normalize("\uff50a\u200bss\x00word", fold_confusables=False) == "password"


def test_what_is_not_normalised() -> None:
    # Spelling the word differently is changing the message, not hiding it.
    for text in ("p4ssw0rd", "p a s s w o r d", "p.a.s.s.w.o.r.d", "PassWord"):
        assert normalize(text) == text
    # ASCII look-alikes of ASCII are left alone (UTS #39 would send "|" to "l").
    assert normalize('a|b "c" `d`') == 'a|b "c" `d`'
    # Combining marks stay (NFKC composes them where a precomposed letter exists).
    assert normalize("p\u0308assword") == "p\u0308assword"
    assert normalize("e\u0301") == "\u00e9"


def test_tab_newline_and_carriage_return_are_kept() -> None:
    assert normalize("a\tb\nc\r\nd") == "a\tb\nc\r\nd"
    assert normalize("\u0430\tb\nc\r\n") == "a\tb\nc\r\n"


def test_pure_ascii_comes_back_as_the_same_object() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 7
    assert normalize(text) is text
    with_lines = "line one\n\tline two\r\n" * 10
    assert normalize(with_lines) is with_lines


def test_a_fold_that_enables_a_composition_is_followed_through() -> None:
    # Cyrillic es + cedilla: folds to "c" + cedilla, which NFKC composes to c-cedilla,
    # which folds to "c". One pass would leave a text that a second call changes.
    once = normalize("\u0441\u0327")
    assert once == "c"
    assert normalize(once) == once
    # An ignorable between a letter and its mark: removed, then the two compose.
    assert normalize("a\u200b\u0301") == "\u00e1"


def test_wholly_cyrillic_text_is_folded_visually_not_transliterated() -> None:
    moscow = "\u041c\u043e\u0441\u043a\u0432\u0430"
    assert normalize(moscow) == "Mockba"
    assert normalize(moscow, fold_confusables=False) == moscow


def test_the_confusable_table_maps_non_ascii_to_printable_ascii_only() -> None:
    table = confusable_table()
    assert len(table) > 1000
    assert table["\u0440"] == "p" and table["\u0430"] == "a" and table["\u0391"] == "A"
    for char, target in table.items():
        assert not char.isascii()
        assert target and target.isascii() and target.isprintable()
        # The fold runs after NFKC: an entry for a character NFKC changes would be dead.
        assert unicodedata.normalize("NFKC", char) == char
    assert "disarm" in confusables_source() and "Unicode confusables" in confusables_source()


def test_the_ignorable_table_is_sorted_disjoint_and_covers_the_named_characters() -> None:
    previous_end = -1
    for start, end in DEFAULT_IGNORABLE_RANGES:
        assert previous_end < start <= end
        previous_end = end
    for cp in (0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x180E, 0x200B, 0x200D, 0x202E,
               0x2060, 0x2069, 0x3164, 0xFE0F, 0xFEFF, 0xFFA0, 0xFFF8, 0x1BCA3, 0x1D17A,
               0xE0001, 0xE01EF):  # fmt: skip
        assert normalize(f"a{chr(cp)}b") == "ab", hex(cp)


# -- properties ---------------------------------------------------------------------------

# Every code point but surrogates, with the interesting ones drawn often.
_interesting = st.sampled_from(
    [chr(cp) for start, end in DEFAULT_IGNORABLE_RANGES[:16] for cp in range(start, end + 1)]
    + [chr(cp) for cp in range(0x00, 0x20)]
    + [chr(cp) for cp in range(0x7F, 0xA0)]
    + list(confusable_table())
    + ["\u0301", "\u0308", "\u0327", "\uff41", "\ufb01", "\u3000", "\U0001d41a", "\U000e0041"]
)
_text = st.text(alphabet=st.one_of(st.characters(exclude_categories=("Cs",)), _interesting))
_SETTINGS = settings(max_examples=300, deadline=None)


def _bad_characters(text: str) -> list[str]:
    bad = []
    for char in text:
        cp = ord(char)
        ignorable = any(start <= cp <= end for start, end in DEFAULT_IGNORABLE_RANGES)
        control = unicodedata.category(char) == "Cc" and char not in "\t\n\r"
        if ignorable or control:
            bad.append(f"U+{cp:04X}")
    return bad


@_SETTINGS
@given(text=_text, fold=st.booleans())
def test_normalize_is_idempotent(text: str, fold: bool) -> None:
    once = normalize(text, fold_confusables=fold)
    assert normalize(once, fold_confusables=fold) == once


@_SETTINGS
@given(text=_text, fold=st.booleans())
def test_no_ignorable_and_no_control_survives(text: str, fold: bool) -> None:
    assert _bad_characters(normalize(text, fold_confusables=fold)) == []


@_SETTINGS
@given(text=_text)
def test_the_output_is_nfkc(text: str) -> None:
    assert unicodedata.is_normalized("NFKC", normalize(text))


@_SETTINGS
@given(
    text=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)),
    fold=st.booleans(),
)
def test_printable_ascii_is_unchanged(text: str, fold: bool) -> None:
    assert normalize(text, fold_confusables=fold) is text


# -- forbidden controls -------------------------------------------------------------------


def test_forbidden_controls_names_them_once_in_order_of_appearance() -> None:
    text = "a\u202eb\x00c\u202e\u2066d\x00\u2069"
    assert forbidden_controls(text) == [
        "U+202E RIGHT-TO-LEFT OVERRIDE",
        "U+0000 NUL",
        "U+2066 LEFT-TO-RIGHT ISOLATE",
        "U+2069 POP DIRECTIONAL ISOLATE",
    ]


def test_forbidden_controls_on_clean_and_ascii_text() -> None:
    assert forbidden_controls("plain text") == []
    assert forbidden_controls("caf\u00e9 \u200b zero width is not forbidden") == []
    assert forbidden_controls("nul\x00in ascii") == ["U+0000 NUL"]


def test_forbidden_controls_reports_at_most_ten() -> None:
    every = "".join(FORBIDDEN_CONTROLS) * 3
    names = forbidden_controls(every)
    assert len(names) == 10 == len(set(names))
    assert names[0] == "U+0000 NUL" and names[1] == "U+202A LEFT-TO-RIGHT EMBEDDING"


# -- fields of a message ------------------------------------------------------------------


def _message(**overrides: Any) -> AgentMessage:
    fields: dict[str, Any] = {
        "message_id": "m-1",
        "sender_id": "s\u0430nder",
        "recipient_id": "r-1",
        "sender_role": "planner",
        "security_level": "standard",
        "content": "pass\u200bword",
        "content_type": "text/plain",
    }
    fields.update(overrides)
    return AgentMessage(**fields)


def test_scanned_fields_in_a_stable_order_content_first() -> None:
    message = _message(metadata={"k": "v"})
    every = scanned_fields(
        message, ["metadata", "ids", "content_type", "content"], fold_confusables=True
    )
    assert every == [
        ("content", "password"),
        ("content_type", "text/plain"),
        ("message_id", "m-1"),
        ("sender_id", "sander"),
        ("recipient_id", "r-1"),
        ("sender_role", "planner"),
        ("security_level", "standard"),
        ("metadata.k#key", "k"),
        ("metadata.k", "v"),
    ]
    assert scanned_fields(message, ["content"], fold_confusables=False) == [("content", "password")]
    assert scanned_fields(message, ["ids"], fold_confusables=False)[1] == (
        "sender_id",
        "s\u0430nder",
    )
    assert scanned_fields(message, [], fold_confusables=True) == []


def test_scanned_fields_walks_nested_metadata_keys_and_scalars() -> None:
    metadata = {
        "a": {"b": ["x", 7, {"c\u200bd": "pass\u00adword"}], "n": None},
        "flag": True,
        "off": False,
        "ratio": 1.5,
        "weird key.\n": "\uff56",
        "": "empty key",
    }
    scanned = scanned_fields(_message(metadata=metadata), ["metadata"], fold_confusables=True)
    assert scanned == [
        ("metadata.a#key", "a"),
        ("metadata.a.b#key", "b"),
        ("metadata.a.b[0]", "x"),
        ("metadata.a.b[1]", "7"),
        ('metadata.a.b[2]["c\\u200bd"]#key', "cd"),
        ('metadata.a.b[2]["c\\u200bd"]', "password"),
        ("metadata.a.n#key", "n"),  # the key is scanned, the None value is not
        ("metadata.flag#key", "flag"),
        ("metadata.flag", "true"),
        ("metadata.off#key", "off"),
        ("metadata.off", "false"),
        ("metadata.ratio#key", "ratio"),
        ("metadata.ratio", "1.5"),
        ('metadata["weird key.\\n"]#key', "weird key.\n"),
        ('metadata["weird key.\\n"]', "v"),
        ('metadata[""]#key', ""),
        ('metadata[""]', "empty key"),
    ]
    # Every path is plain ASCII, safe for a log line or a rejection reason.
    assert all(path.isascii() and path.isprintable() for path, _ in scanned)


def test_a_long_key_is_cut_in_the_path_but_scanned_whole() -> None:
    key = "k" * 100 + "!"
    scanned = scanned_fields(_message(metadata={key: 1}), ["metadata"], fold_confusables=True)
    assert scanned[0] == ('metadata["' + "k" * 61 + '..."]#key', key)
    assert scanned[1][1] == "1"


def test_hide_keys_names_a_matched_key_and_everything_under_it_by_position() -> None:
    secret = "sk-" + "Q7" * 12
    metadata = {
        "a": 1,
        secret: {"note": "n", "x": [secret, {"y": 2}]},
        "tokens": {"z": 1, f"Bearer {secret}": "v", "keep": {"deep": 3}},
    }
    every = [
        path
        for path, _ in scanned_fields(
            _message(metadata=metadata), ["metadata"], fold_confusables=True
        )
    ]
    hidden = [f"metadata.{secret}#key", f'metadata.tokens["Bearer {secret}"]#key']
    shown = hide_keys(metadata, hidden)
    assert shown == {
        f"metadata.{secret}#key": "metadata{1}#key",
        f"metadata.{secret}": "metadata{1}",
        f"metadata.{secret}.note#key": "metadata{1}.note#key",
        f"metadata.{secret}.note": "metadata{1}.note",
        f"metadata.{secret}.x#key": "metadata{1}.x#key",
        f"metadata.{secret}.x": "metadata{1}.x",
        f"metadata.{secret}.x[0]": "metadata{1}.x[0]",
        f"metadata.{secret}.x[1]": "metadata{1}.x[1]",
        f"metadata.{secret}.x[1].y#key": "metadata{1}.x[1].y#key",
        f"metadata.{secret}.x[1].y": "metadata{1}.x[1].y",
        f'metadata.tokens["Bearer {secret}"]#key': "metadata.tokens{1}#key",
        f'metadata.tokens["Bearer {secret}"]': "metadata.tokens{1}",
    }
    # every scanned path that spells the secret out has a replacement without it (and
    # so does each path of a container under the key, which holds no text of its own)
    assert {p for p in every if secret in p} <= set(shown)
    assert not any(secret in p for p in shown.values())
    assert hide_keys(metadata, []) == {}


def test_metadata_deeper_than_the_bound_is_refused_not_skipped() -> None:
    def nested(levels: int) -> dict[str, Any]:
        tree: dict[str, Any] = {"leaf": "password"}
        for _ in range(levels - 1):
            tree = {"d": tree}
        return tree

    fine = _message(metadata=nested(3))
    scanned = scanned_fields(fine, ["metadata"], fold_confusables=True, max_depth=3)
    assert scanned[-1] == ("metadata.d.d.leaf", "password")

    # Built without validation (the schema refuses it), as a buggy or hostile caller might.
    too_deep = AgentMessage.model_construct(**{**_message().model_dump(), "metadata": nested(4)})
    with pytest.raises(ScanLimitExceeded, match="deeper than 3") as caught:
        scanned_fields(too_deep, ["metadata"], fold_confusables=True, max_depth=3)
    assert caught.value.path == "metadata.d.d.d"
    # Content is not metadata: no walk, no limit.
    assert scanned_fields(too_deep, ["content"], fold_confusables=True, max_depth=3)


def test_a_deep_tree_does_not_exhaust_the_stack() -> None:
    tree: Any = "x"
    for _ in range(2_000):  # deeper than the interpreter's recursion limit
        tree = [tree]
    message = AgentMessage.model_construct(**{**_message().model_dump(), "metadata": {"t": tree}})
    with pytest.raises(ScanLimitExceeded):
        scanned_fields(message, ["metadata"], fold_confusables=True)
    scanned = scanned_fields(
        message, ["metadata"], fold_confusables=True, max_depth=3_000, max_items=3_000
    )
    assert scanned[-1] == ("metadata.t" + "[0]" * 2_000, "x")


def test_metadata_with_too_many_items_is_refused() -> None:
    message = _message(metadata={"list": list(range(20))})
    assert len(scanned_fields(message, ["metadata"], fold_confusables=True, max_items=21)) == 21
    with pytest.raises(ScanLimitExceeded, match="more than 20"):
        scanned_fields(message, ["metadata"], fold_confusables=True, max_items=20)


def test_the_default_bounds_accept_whatever_the_schema_accepts() -> None:
    # 16 levels of dicts (the metadata dict is level 1) is what validation lets through.
    tree: dict[str, Any] = {"leaf": "x"}
    for _ in range(15):
        tree = {"d": tree}
    assert scanned_fields(_message(metadata=tree), ["metadata"], fold_confusables=True)


def test_an_unknown_field_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        scanned_fields(_message(), ["content", "auth"], fold_confusables=True)


# -- spans --------------------------------------------------------------------------------


def _short_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def test_mask_spans_masks_and_merges_overlaps() -> None:
    text = "user password=hunter2 and token=abc"
    assert mask_spans(text, [(14, 21)], "mask") == "user password=[MASKED] and token=abc"
    assert mask_spans(text, [(32, 35), (14, 18), (16, 21)], "mask") == (
        "user password=[MASKED] and token=[MASKED]"
    )
    # Touching spans become one marker; empty spans do nothing.
    assert mask_spans(text, [(5, 13), (13, 21), (0, 0)], "mask") == "user [MASKED] and token=abc"
    assert mask_spans(text, [], "mask") == text


def test_mask_spans_hash_mode() -> None:
    text = "k\u00e9y=s\u00e9cret!"
    start = text.index("s")
    masked = mask_spans(text, [(start, len(text) - 1)], "hash")
    digest = _short_sha("s\u00e9cret")
    assert masked == f"k\u00e9y=[sha256:{digest}]!"
    assert re.fullmatch(r"k\u00e9y=\[sha256:[0-9a-f]{12}\]!", masked)


def test_mask_spans_refuses_spans_outside_the_text() -> None:
    for bad in [(-1, 2), (3, 2), (0, 99)]:
        with pytest.raises(ValueError):
            mask_spans("short", [bad], "mask")
    with pytest.raises(ValueError):
        mask_spans("short", [(0, 1)], "redact")  # type: ignore[arg-type]


def test_byte_spans_become_char_spans_for_non_ascii_text() -> None:
    text = "\u00e9t\u00e9 \u65e5\u672c password \U0001f600 password"
    data = text.encode()
    pattern = re2.compile("password")
    byte_spans = [match.span() for match in pattern.finditer(data)]
    assert len(byte_spans) == 2
    char_spans = byte_spans_to_char_spans(text, byte_spans)
    assert [text[start:end] for start, end in char_spans] == ["password", "password"]
    assert char_spans == [(m.start(), m.end()) for m in re.finditer("password", text)]
    # Order and duplicates are kept; the end of the text is a valid offset.
    assert byte_spans_to_char_spans(text, [(len(data), len(data)), (0, 2), (0, 2)]) == [
        (len(text), len(text)),
        (0, 1),
        (0, 1),
    ]
    # Chained with mask_spans, as the policy engine would.
    assert mask_spans(text, char_spans, "mask").count("[MASKED]") == 2


def test_byte_spans_in_ascii_text_are_char_spans() -> None:
    assert byte_spans_to_char_spans("abc password", [(4, 12)]) == [(4, 12)]
    with pytest.raises(ValueError):
        byte_spans_to_char_spans("abc", [(0, 4)])


def test_a_byte_offset_inside_a_character_is_an_error() -> None:
    with pytest.raises(ValueError, match="inside a UTF-8 character"):
        byte_spans_to_char_spans("\u00e9a", [(1, 3)])
    with pytest.raises(ValueError):
        byte_spans_to_char_spans("\u00e9a", [(0, 9)])


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",))), data=st.data())
def test_byte_to_char_conversion_round_trips(text: str, data: st.DataObject) -> None:
    boundaries = [len(text[:i].encode()) for i in range(len(text) + 1)]
    spans = data.draw(
        st.lists(st.tuples(st.integers(0, len(text)), st.integers(0, len(text))), max_size=5)
    )
    char_spans = [(min(a, b), max(a, b)) for a, b in spans]
    byte_spans = [(boundaries[a], boundaries[b]) for a, b in char_spans]
    assert byte_spans_to_char_spans(text, byte_spans) == char_spans
