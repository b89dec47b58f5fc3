"""docs/behaviour.md defines every rule the project cites.

The code, the tests and the documents cite rules by ID: the rules of the
specification the project started from (which is not in the repository)
and the bridge's own ``AS`` rules. docs/behaviour.md is the project's own
reference for all of them, and these tests keep it complete:

* every rule ID cited in the scanned files is *defined* in the document,
  and no ID is defined twice;
* every rule the document defines names the Postfix source file it
  derives from, or says it is the bridge's own rule;
* every section number of the specification cited as "spec N.N"
  ("section N", "vectors N.N") has a row in the document's section table.

What counts as an ID, a citation and a definition is spelled out in the
constants below; keep them and the document's conventions in step.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "behaviour.md"

#: The files whose citations must be defined: all Python code of the
#: bridge, the tests and the benchmarks, the README and the other documents.
SCANNED_GLOBS = ("bridge/**/*.py", "tests/**/*.py", "bench/**/*.py", "README.md", "docs/*.md")

#: Files not scanned: the document itself (it defines rather than cites)
#: and this file, whose docstrings and messages may show example IDs.
SCAN_EXCLUDED = frozenset({DOCUMENT, Path(__file__).resolve()})

#: A rule ID: a family of one to four upper-case ASCII letters, a hyphen
#: and the rule's number, optionally ``.STEP`` for one numbered step of the
#: rule (``MC-13.1`` is step 1 of ``MC-13``). ``\b`` on both sides keeps it
#: from matching inside longer words; a step needs a digit after the dot,
#: so a sentence-final dot (``see MC-13.``) is not taken for one.
ID_PATTERN = r"\b(?P<family>[A-Z]{1,4})-(?P<number>[0-9]+)(?:\.(?P<step>[0-9]+))?\b"
ID_RE = re.compile(ID_PATTERN)

#: Families of tokens that have the shape of an ID but are something else:
#: ``UTF-8``, ``SHA-256``, ``RFC-822``, ``ISO-8859`` and the ``N-1`` of
#: "keys 0 .. N-1". (``AS-IS`` has no number and never matches.) A new
#: family seen anywhere else is taken for a rule family on purpose, so
#: that a first citation of, say, a ``PXC`` rule fails here until defined.
NOT_RULE_FAMILIES = frozenset({"UTF", "SHA", "RFC", "ISO", "N"})

#: A range of rules, which cites every rule in between: ``SM-4 .. SM-6``,
#: ``CF-1..8``, ``TCP-1 to TCP-3`` (en dash too). A plain hyphen is not a
#: range separator here: ``MC-13.4-7`` is a range of steps (below).
RANGE_RE = re.compile(
    r"\b(?P<family>[A-Z]{1,4})-(?P<first>[0-9]+)\s*(?:\.\.|\u2013|\bto\b)\s*"
    r"(?:(?P<family2>[A-Z]{1,4})-)?(?P<last>[0-9]+)\b(?!\.[0-9])"
)

#: A range of steps of one rule: ``MC-13.4-7`` cites ``MC-13.4`` to ``MC-13.7``.
STEP_RANGE_RE = re.compile(
    r"\b(?P<family>[A-Z]{1,4})-(?P<number>[0-9]+)\.(?P<first>[0-9]+)-(?P<last>[0-9]+)\b"
)

#: Steps cited in words: ``MC-13 step 5``, ``SM-6 steps 1, 2 and 4``,
#: ``MC-13 steps 1, 4-7``. Each item is a number or a ``N-M`` range; a
#: number followed by ``.digit`` (a Postfix version such as 3.12) ends the list.
_STEP_ITEM = r"[0-9]+(?:\s*[-\u2013]\s*[0-9]+)?(?![0-9]|\.[0-9])"
STEP_WORDS_RE = re.compile(
    r"\b(?P<family>[A-Z]{1,4})-(?P<number>[0-9]+)(?:'s)?\s+steps?\s+"
    rf"(?P<items>{_STEP_ITEM}(?:\s*(?:,|\band\b)\s*{_STEP_ITEM})*)"
)

#: A definition in the document: a heading whose text starts with the ID,
#: or a line (optionally a list item) that starts with the ID in bold,
#: ``**MC-13 Key preparation.**`` or ``1. **MC-13.1** ...``. A mere
#: mention elsewhere in a sentence does not define anything.
DEFINITION_RE = re.compile(
    r"^(?:#{1,6}[ \t]+|[ \t]*(?:(?:[-*+]|[0-9]+\.)[ \t]+)?\*\*)" + ID_PATTERN,
    re.MULTILINE,
)

#: A heading line; it ends the text that belongs to the definition above it.
HEADING_RE = re.compile(r"^#{1,6}[ \t]", re.MULTILINE)

#: A Postfix source file named in a definition: a backquoted path below
#: Postfix's ``src/`` directory, such as ``global/dict_memcache.c``.
SOURCE_RE = re.compile(r"`(?:[a-z0-9_]+/)+[a-z0-9_]+\.[ch]`")

#: What a definition says instead when the rule is the bridge's own.
OWN_RULE_MARK = "bridge's own rule"

#: A cited section of the specification: ``spec 12.6``, ``spec section 2``,
#: ``section 0``, ``vectors 12.11``. Only the first number after the word
#: is taken: later numbers in a list are too often Postfix versions
#: (``spec 12.5, 3.7 only``). The document lists every section anyway.
SECTION_CITE_RE = re.compile(
    r"\b(?:spec(?:ification)?(?:\s+section)?|section|vectors?)\s+"
    r"(?P<section>[0-9]+(?:\.[0-9]+)?)\b(?!\.[0-9])",
    re.IGNORECASE,
)

#: A section row of the document's table: ``| 12.6 | ...``.
SECTION_ROW_RE = re.compile(r"^\|\s*(?P<section>[0-9]+(?:\.[0-9]+)?)\s*\|", re.MULTILINE)


def scanned_files() -> list[Path]:
    """Every file whose citations must be defined, sorted."""
    found = {
        path.resolve()
        for pattern in SCANNED_GLOBS
        for path in ROOT.glob(pattern)
        if path.is_file() and path.resolve() not in SCAN_EXCLUDED
    }
    return sorted(found)


def _rule(family: str, number: int | str, step: int | str | None = None) -> str:
    return f"{family}-{number}" if step is None else f"{family}-{number}.{step}"


def _step_items(items: str) -> Iterator[int]:
    for item in re.split(r"\s*(?:,|\band\b)\s*", items):
        first, _, last = re.sub(r"\s", "", item).replace("\u2013", "-").partition("-")
        yield from range(int(first), int(last or first) + 1)


def cited_ids(text: str) -> set[str]:
    """The rule IDs ``text`` cites, ranges and step lists expanded."""
    cited = {m.group(0) for m in ID_RE.finditer(text)}
    for m in RANGE_RE.finditer(text):
        family, family2 = m.group("family"), m.group("family2")
        if family2 is None or family2 == family:
            first, last = int(m.group("first")), int(m.group("last"))
            cited.update(_rule(family, n) for n in range(first, last + 1))
    for m in STEP_RANGE_RE.finditer(text):
        first, last = int(m.group("first")), int(m.group("last"))
        cited.update(_rule(m.group("family"), m.group("number"), s) for s in range(first, last + 1))
    for m in STEP_WORDS_RE.finditer(text):
        cited.update(
            _rule(m.group("family"), m.group("number"), s) for s in _step_items(m.group("items"))
        )
    return {rule for rule in cited if rule.split("-")[0] not in NOT_RULE_FAMILIES}


def cited_sections(text: str) -> set[str]:
    """The specification sections ``text`` cites by number."""
    return {m.group("section") for m in SECTION_CITE_RE.finditer(text)}


def citations() -> dict[str, list[str]]:
    """Every cited rule ID -> the files (relative to the root) citing it."""
    where: dict[str, list[str]] = {}
    for path in scanned_files():
        for rule in cited_ids(path.read_text(encoding="utf-8")):
            where.setdefault(rule, []).append(str(path.relative_to(ROOT)))
    return where


def definitions(document: str) -> dict[str, str]:
    """Every rule the document defines -> the text that belongs to it.

    The text of a rule runs from its definition to the next heading or the
    next definition, except that the steps of a rule (``MC-13.1`` ...)
    belong to it as well, so the ``Source:`` line after a list of steps
    is part of the rule's text.
    """
    starts: list[tuple[int, str]] = []
    for m in DEFINITION_RE.finditer(document):
        rule = _rule(m.group("family"), m.group("number"), m.group("step"))
        starts.append((m.start(), rule))
    headings = [m.start() for m in HEADING_RE.finditer(document)]
    texts: dict[str, str] = {}
    for index, (start, rule) in enumerate(starts):
        end = min((h for h in headings if h > start), default=len(document))
        for later_start, later in starts[index + 1 :]:
            if not later.startswith(rule + "."):
                end = min(end, later_start)
                break
        texts[rule] = texts.get(rule, "") + document[start:end]
    return texts


def _sort_key(rule: str) -> tuple[str, list[int]]:
    family, _, number = rule.partition("-")
    return family, [int(part) for part in number.split(".")]


def test_id_pattern_examples() -> None:
    # The shapes the scan must and must not take for citations.
    text = (
        "UTF-8, SHA-256, keys 0 .. N-1; AB-1 .. AB-3, CD-1..2, EF-5.2-3, "
        "GH-7 steps 1, 4-5 and 8 (3.12), IJ-9 step 2, 3.7 only; see KL-4."
    )
    assert cited_ids(text) == {
        "AB-1", "AB-2", "AB-3", "CD-1", "CD-2", "EF-5.2", "EF-5.3",
        "GH-7", "GH-7.1", "GH-7.4", "GH-7.5", "GH-7.8", "IJ-9", "IJ-9.2", "KL-4",
    }  # fmt: skip
    assert cited_sections("spec 12.5, 3.7 only; (spec section 0); vectors 12.11") == {
        "12.5",
        "0",
        "12.11",
    }
    document = "## X\n\n**AB-1 One.** Text.\n1. **AB-1.1** A step.\nSource: `util/x.c`.\n"
    texts = definitions(document + "**AB-2** Mentions AB-1.\n")
    assert set(texts) == {"AB-1", "AB-1.1", "AB-2"}
    assert "**AB-1.1**" in texts["AB-1"]
    assert "Source:" in texts["AB-1"]
    assert "Source:" not in texts["AB-2"]


def test_every_cited_id_is_defined() -> None:
    defined = set(definitions(DOCUMENT.read_text(encoding="utf-8")))
    missing = {rule: files for rule, files in citations().items() if rule not in defined}
    report = "\n".join(
        f"  {rule}: cited in {', '.join(sorted(missing[rule]))}"
        for rule in sorted(missing, key=_sort_key)
    )
    assert not missing, f"rule IDs cited but not defined in docs/behaviour.md:\n{report}"


def test_every_id_is_defined_once() -> None:
    document = DOCUMENT.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    for m in DEFINITION_RE.finditer(document):
        rule = _rule(m.group("family"), m.group("number"), m.group("step"))
        seen[rule] = seen.get(rule, 0) + 1
    twice = sorted((rule for rule, count in seen.items() if count > 1), key=_sort_key)
    assert not twice, f"rules defined more than once in docs/behaviour.md: {', '.join(twice)}"


def test_every_defined_id_names_its_source() -> None:
    texts = definitions(DOCUMENT.read_text(encoding="utf-8"))
    unsourced: list[str] = []
    for rule, text in sorted(texts.items(), key=lambda item: _sort_key(item[0])):
        # A step (MC-13.1) may rely on its rule's text (MC-13) for the source.
        parent = rule.rpartition(".")[0]
        candidates = [text, texts.get(parent, "")]
        if not any(SOURCE_RE.search(t) or OWN_RULE_MARK in t for t in candidates):
            unsourced.append(rule)
    assert not unsourced, (
        "rules in docs/behaviour.md naming no Postfix source file "
        f"(nor {OWN_RULE_MARK!r}): {', '.join(unsourced)}"
    )


def test_every_cited_spec_section_is_listed() -> None:
    listed = {m.group("section") for m in SECTION_ROW_RE.finditer(DOCUMENT.read_text("utf-8"))}
    missing: dict[str, list[str]] = {}
    for path in scanned_files():
        for section in cited_sections(path.read_text(encoding="utf-8")) - listed:
            missing.setdefault(section, []).append(str(path.relative_to(ROOT)))
    report = "\n".join(f"  {s}: cited in {', '.join(files)}" for s, files in missing.items())
    assert not missing, f"spec sections cited but not in docs/behaviour.md's table:\n{report}"
