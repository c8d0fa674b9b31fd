"""The relation phrase of a prompt: the words CLIP-R scores (paper section 4, "Evaluation").

Nouns inflate CLIP-T, so the paper scores the image against the relation words alone, extracted with spaCy:
"A dog is hugging a cat." -> "hugging". Two backends give the same kind of answer:

* ``spacy`` (pip extra ``nlp`` plus a pipeline such as ``en_core_web_sm``): the noun chunks that hold a subject
  phrase are dropped (without subject phrases: the chunks of the grammatical subject and its conjuncts), and so
  are auxiliaries and punctuation.
* ``rules`` (no dependencies): lowercase, punctuation stripped; each subject phrase (longest first, a plural ``s`` /
  ``es`` allowed) is dropped together with the determiners just before it ("my dog", "the two dogs"); auxiliaries
  (is, are, was, ...) are dropped; leading and trailing conjunctions and determiners are trimmed. What stays keeps
  its order: verbs, prepositions, objects that are not subjects and the scene ("playing guitar on a park bench").

Text in braces is a subject: ``"A {dog} is hugging a {}."`` names ``dog`` and an empty slot.

Limits of the rules without subject phrases: only the leading noun phrase(s) of the grammatical subject are
found (an article up to the first auxiliary, ``-ing`` word, preposition or conjunction; when nothing stops a phrase
its last word is kept as the verb, "a polar bear hug" -> "hug"). An object subject stays ("hugging a cat"), and a
prompt that does not start with an article keeps its subject. Pass the subject phrases when they are known.
When nothing is left (the prompt names only subjects) the cleaned prompt is returned, so CLIP-R equals CLIP-T.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "SPACY_PIPELINES", "relation_phrase"]

BACKENDS = ("auto", "spacy", "rules")
SPACY_PIPELINES = ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf")

DETERMINERS = frozenset(
    "a an the my his her their its our your this that these those some two three both each".split()
)
AUXILIARIES = frozenset("is are was were be been being am 's".split())
CONJUNCTIONS = frozenset("and or & plus".split())
# words that end a leading noun phrase when no subject phrases are given (rules backend)
_PREPOSITIONS = frozenset(
    "with on in at by to of from into onto over under near next beside behind above below around "
    "through across against along among between inside outside for while".split()
)
_EMPTY_SLOT = "thing"  # stands in for "{}" so that both backends see plain text
_WORD = re.compile(r"[a-z0-9&]+(?:['-][a-z0-9]+)*")
_BRACES = re.compile(r"\{([^{}]*)\}")


def _words(text: str) -> list[str]:
    """Lowercased words, punctuation stripped (apostrophes and hyphens inside a word stay)."""
    return _WORD.findall(text.lower())


def _matches(words: Sequence[str], start: int, phrase: Sequence[str]) -> bool:
    """``phrase`` occurs at ``words[start:]``; its last word may carry a plural ``s`` / ``es``."""
    if start + len(phrase) > len(words):
        return False
    *head, last = phrase
    if list(words[start:start + len(head)]) != head:
        return False
    word = words[start + len(head)]
    return word in (last, last + "s", last + "es")


def _subject_mask(words: Sequence[str], phrases: Sequence[str]) -> list[bool]:
    """True for each word of a subject phrase (longest phrases first) and the determiners just before it."""
    mask = [False] * len(words)
    tokenized = sorted({tuple(_words(p)) for p in phrases} - {()}, key=len, reverse=True)
    for phrase in tokenized:
        i = 0
        while i < len(words):
            if not any(mask[i:i + len(phrase)]) and _matches(words, i, phrase):
                mask[i:i + len(phrase)] = [True] * len(phrase)
                j = i - 1
                while j >= 0 and not mask[j] and words[j] in DETERMINERS:  # "my dog", "the two dogs"
                    mask[j] = True
                    j -= 1
                i += len(phrase)
            else:
                i += 1
    return mask


def _leading_subject_mask(words: Sequence[str]) -> list[bool]:
    """No subject phrases: mask the leading article-led noun phrase(s) joined by conjunctions (see module doc)."""
    mask = [False] * len(words)
    i = 0
    while i < len(words) and words[i] in DETERMINERS:
        j = i
        while j < len(words) and words[j] in DETERMINERS:
            j += 1
        stop = j
        while stop < len(words) and not _ends_noun_phrase(words[stop]):
            stop += 1
        if stop == len(words) and stop - j > 1:  # nothing stopped the phrase: its last word is the verb
            stop -= 1
        mask[i:stop] = [True] * (stop - i)
        if stop < len(words) and words[stop] in CONJUNCTIONS:
            i = stop + 1  # "a lion and a polar bear ...": the conjunct is a subject too
        else:
            break
    return mask


def _ends_noun_phrase(word: str) -> bool:
    return word in AUXILIARIES or word in CONJUNCTIONS or word in _PREPOSITIONS or word.endswith("ing")


def _tidy(words: Sequence[str], drop: Sequence[bool]) -> str:
    """Drop masked words and auxiliaries; trim leading / trailing conjunctions and determiners."""
    kept = [w for w, d in zip(words, drop) if not d and w not in AUXILIARIES]
    trim = DETERMINERS | CONJUNCTIONS
    while kept and kept[0] in trim:
        kept.pop(0)
    while kept and kept[-1] in trim:
        kept.pop()
    return " ".join(kept)


# ------------------------------------------------------------------------------------------------ spaCy
@functools.lru_cache(maxsize=1)
def _spacy_pipeline():
    """The first installed English spaCy pipeline, or None when spaCy or every pipeline is missing."""
    try:
        import spacy
    except ImportError:
        return None
    for name in SPACY_PIPELINES:
        if spacy.util.is_package(name):
            logger.info("relation phrases: spaCy pipeline %s", name)
            return spacy.load(name)
    return None


def _spacy_drop(nlp, text: str, phrases: Sequence[str]) -> tuple[list[str], list[bool]]:
    """Words of ``text`` and which to drop: subject noun chunks, auxiliaries, punctuation."""
    doc = nlp(text)
    words = [t.text.lower() for t in doc]
    drop = [t.pos_ in ("PUNCT", "AUX") or t.dep_ in ("aux", "auxpass", "punct") for t in doc]
    chunks = list(doc.noun_chunks)
    if phrases:
        subject = _subject_mask(words, phrases)
        for chunk in chunks:  # a matched word takes its whole noun chunk with it ("a fluffy dog")
            if any(subject[chunk.start:chunk.end]):
                subject[chunk.start:chunk.end] = [True] * (chunk.end - chunk.start)
    else:
        subject = [False] * len(words)
        subject_roots: set[int] = set()
        for chunk in chunks:  # in document order, so a conjunct's head is seen first
            root = chunk.root
            if root.dep_ in ("nsubj", "nsubjpass") or (root.dep_ == "conj" and root.head.i in subject_roots):
                subject_roots.add(root.i)
                subject[chunk.start:chunk.end] = [True] * (chunk.end - chunk.start)
    return words, [d or s for d, s in zip(drop, subject)]


# ----------------------------------------------------------------------------------------------- public
def relation_phrase(prompt: str, subject_phrases: Sequence[str] | None = None, backend: str = "auto") -> str:
    """The relation words of ``prompt`` (what CLIP-R scores); see the module docstring for the method.

    Args:
        prompt: the generation prompt, e.g. ``"A dog is hugging a cat."``.
        subject_phrases: the subjects' phrases (``["dog", "cat"]``); braces in the prompt add theirs.
        backend: ``auto`` (spaCy when a pipeline is installed, else rules), ``spacy`` or ``rules``.
    Returns:
        Lowercased words without punctuation, e.g. ``"hugging"``.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if subject_phrases is not None and (
        isinstance(subject_phrases, str) or not all(isinstance(p, str) for p in subject_phrases)
    ):
        raise ValueError(f"subject_phrases must be a list of strings, got {subject_phrases!r}")
    braced = [m.strip() or _EMPTY_SLOT for m in _BRACES.findall(prompt)]
    phrases = [*braced, *(subject_phrases or [])]
    text = _BRACES.sub(lambda m: m.group(1).strip() or _EMPTY_SLOT, prompt)

    nlp = None if backend == "rules" else _spacy_pipeline()
    if backend == "spacy" and nlp is None:
        raise ImportError(
            "relation_phrase(backend='spacy') needs spaCy and an English pipeline: "
            "pip install 'dreamrelation[nlp]' && python -m spacy download en_core_web_sm"
        )
    if nlp is not None:
        words, drop = _spacy_drop(nlp, text, phrases)
    else:
        words = _words(text)
        drop = _subject_mask(words, phrases) if phrases else _leading_subject_mask(words)
    return _tidy(words, drop) or " ".join(_words(text))
