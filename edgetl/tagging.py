"""Word-level tag sequences (named-entity recognition): CoNLL and JSON-lines sources, tag schemes, and the alignment
of word tags to sub-word tokens.

Tags are normalised to IOB2 (``B-X`` starts every entity, ``I-X`` continues it, ``O`` is outside), whatever the file
uses: IOB1 (``I-X`` may start an entity; ``B-X`` only between two adjacent entities of one type) and BIOES / IOBES
(``S-X`` single-word entity, ``E-X`` last word) are converted. A sequence that is invalid in its own scheme (IOB2's
``O I-PER``, BIOES's ``B-PER O``) or an unknown tag prefix is one error naming the file and line. Word labels reach
the sub-word tokens through the fast tokenizer's ``word_ids``: the first token of each word carries the word's tag,
the others and the special tokens are ignored (-100) in the loss and the metric.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetl.errors import EdgetlError

IGNORE = -100  # the label of tokens that carry no word tag (sub-word continuations, [CLS], [SEP], padding)
SCHEMES = ("auto", "iob1", "iob2", "bioes")


def _split(tag: str, where: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        raise EdgetlError(f"{where}: tag '{tag}' is not O or <B|I|E|S>-<TYPE>")
    return prefix, kind


def detect_scheme(sentences: list[list[str]]) -> str:
    """bioes when E-/S- appear; iob1 when some entity starts with I- (after O or another type); else iob2."""
    prefixes = {t.split("-", 1)[0] for s in sentences for t in s}
    if prefixes & {"E", "S"}:
        return "bioes"
    for tags in sentences:
        prev = "O"
        for tag in tags:
            if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
                return "iob1"
            prev = tag
    return "iob2"


def to_iob2(tags: list[str], scheme: str, where: str) -> list[str]:
    """``tags`` (one sentence in ``scheme``) as IOB2; an invalid sequence is one EdgetlError naming ``where``."""
    out, prev_kind, inside = [], "", False  # inside: the previous word belongs to an entity of prev_kind
    for i, tag in enumerate(tags):
        prefix, kind = _split(tag, where)
        here = f"{where}, word {i + 1} ('{tag}' after '{tags[i - 1] if i else '<start>'}')"
        if scheme == "iob2":
            if prefix in ("E", "S"):
                raise EdgetlError(f"{here}: {prefix}- is not an IOB2 tag (set data.tag_scheme: bioes)")
            if prefix == "I" and not (inside and kind == prev_kind):
                raise EdgetlError(
                    f"{here}: I- must continue an entity of its type in IOB2 (IOB1 file? set data.tag_scheme: iob1)"
                )
            out.append(tag)
        elif scheme == "iob1":
            if prefix in ("E", "S"):
                raise EdgetlError(f"{here}: {prefix}- is not an IOB1 tag")
            starts = prefix == "B" or not (inside and kind == prev_kind)
            out.append("O" if prefix == "O" else f"{'B' if starts else 'I'}-{kind}")
        else:  # bioes
            if prefix in ("I", "E") and not (inside and kind == prev_kind):
                raise EdgetlError(f"{here}: {prefix}- must continue an entity of its type in BIOES")
            if inside and prefix not in ("I", "E"):
                raise EdgetlError(f"{here}: the entity before it has no E- (end) tag in BIOES")
            out.append("O" if prefix == "O" else f"{'B' if prefix in ('B', 'S') else 'I'}-{kind}")
        inside = prefix in ("B", "I") if scheme == "bioes" else prefix != "O"
        prev_kind = kind
    if scheme == "bioes" and inside:
        raise EdgetlError(f"{where}: the sentence ends inside an entity (no E- tag) in BIOES")
    return out


def read_conll(path: Path, tag_column: int, where: str | None = None) -> tuple[list[list[str]], list[list[str]], list]:
    """Sentences of a CoNLL-style file: one token per line (columns split on whitespace, the word first and the
    tag in ``tag_column``), blank lines between sentences, ``-DOCSTART-`` lines skipped. Returns (words, tags,
    the line number each sentence starts on)."""
    from edgetl.data import _read_text_file

    text = _read_text_file(path)
    words, tags, lines = [], [], []
    cur_w, cur_t, start = [], [], 0
    for n, line in enumerate(text.split("\n"), 1):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if cur_w:
                words.append(cur_w), tags.append(cur_t), lines.append(start)
                cur_w, cur_t = [], []
            continue
        if len(cols) < 2:
            raise EdgetlError(f"{where or path} line {n}: expected a word and its tag, got {line.strip()[:60]!r}")
        try:
            tag = cols[tag_column]
        except IndexError:
            raise EdgetlError(f"{where or path} line {n}: no column {tag_column} (data.tag_column)") from None
        if not cur_w:
            start = n
        cur_w.append(cols[0])
        cur_t.append(tag)
    if cur_w:
        words.append(cur_w), tags.append(cur_t), lines.append(start)
    if not words:
        raise EdgetlError(f"{where or path} has no sentences")
    return words, tags, lines


def jsonl_sentences(rows: list[dict], token_key: str, tag_key: str, where: str):
    """(words, tags, line numbers) from JSON-lines rows holding a list of tokens and a list of tags."""
    words, tags, lines = [], [], []
    for n, row in enumerate(rows, 1):
        w, t = row.get(token_key), row.get(tag_key)
        if not isinstance(w, list) or not isinstance(t, list) or not w:
            raise EdgetlError(
                f"{where} row {n}: expected non-empty lists in '{token_key}' and '{tag_key}' "
                "(set data.text_column / data.label_column)"
            )
        if len(w) != len(t) or not all(isinstance(x, str) and x.strip() for x in w + t):
            raise EdgetlError(
                f"{where} row {n}: '{token_key}' and '{tag_key}' must be lists of non-empty strings of the same length"
            )
        words.append(w), tags.append(t), lines.append(n)
    return words, tags, lines


def normalise(tags: list[list[str]], lines: list[int], scheme: str, where: str) -> tuple[list[list[str]], str]:
    """Every sentence as IOB2 (``scheme`` "auto": detected over the whole file)."""
    scheme = detect_scheme(tags) if scheme == "auto" else scheme
    return [to_iob2(t, scheme, f"{where} line {line}") for t, line in zip(tags, lines, strict=True)], scheme


def tag_names(tags: list[list[str]]) -> list[str]:
    """ "O" then B-/I- of every entity type, types sorted: the model's output order."""
    kinds = sorted({t[2:] for s in tags for t in s if t != "O"})
    if not kinds:
        raise EdgetlError("the data has no entities (every tag is O)")
    return ["O"] + [f"{p}-{k}" for k in kinds for p in ("B", "I")]


def word_starts(word_ids: list) -> np.ndarray:
    """Per token, whether it is the first token of a word (special tokens and continuations are not)."""
    prev = [None, *word_ids][: len(word_ids)]
    return np.asarray([w is not None and w != p for w, p in zip(word_ids, prev, strict=True)], bool)


def align(word_ids: list, word_tags: np.ndarray) -> np.ndarray:
    """Token labels from word tags: the first token of each word gets its tag, every other token IGNORE."""
    out = np.full(len(word_ids), IGNORE, np.int64)
    for i in np.flatnonzero(word_starts(word_ids)):
        if word_ids[i] < len(word_tags):
            out[i] = word_tags[word_ids[i]]
    return out
