"""Relation phrases for CLIP-R: the rules backend as a table of cases, the spaCy backend through a fake module."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest

from dreamrelation import relation_phrase as R
from dreamrelation.relation_phrase import relation_phrase


@pytest.fixture(autouse=True)
def _fresh_pipeline_cache():
    R._spacy_pipeline.cache_clear()
    yield
    R._spacy_pipeline.cache_clear()


@pytest.mark.parametrize("prompt, subjects, expected", [
    ("A dog is hugging a cat.", ["dog", "cat"], "hugging"),
    ("A cat is hugging with a plushie bear.", ["cat", "plushie bear"], "hugging with"),
    ("A {dog} is playing guitar on a park bench.", None, "playing guitar on a park bench"),
    ("A lion and a polar bear hug.", ["lion", "polar bear"], "hug"),
    ("my dog shaking hands with my cat", ["dog", "cat"], "shaking hands with"),
    ("A {} is hugging a {} in front of the mountain.", None, "hugging in front of the mountain"),
    ("The two dogs are playing with a ball!", ["dog"], "playing with a ball"),  # plural, "the two" dropped
    ("A polar bear and a bear dance.", ["bear", "polar bear"], "dance"),  # longest phrase first
    ("A dog.", ["dog"], "a dog"),  # nothing left: the cleaned prompt (CLIP-R = CLIP-T)
])
def test_rules_with_subjects(prompt, subjects, expected):
    assert relation_phrase(prompt, subjects, backend="rules") == expected


@pytest.mark.parametrize("prompt, expected", [  # no subject phrases: the leading noun phrase(s) go
    ("A dog is hugging a cat.", "hugging a cat"),
    ("A lion and a polar bear hug.", "hug"),
    ("A cat is hugging with a plushie bear.", "hugging with a plushie bear"),
    ("The teddy bear sitting on a chair", "sitting on a chair"),
])
def test_rules_without_subjects(prompt, expected):
    assert relation_phrase(prompt, backend="rules") == expected


def test_auto_uses_rules_without_spacy(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    assert relation_phrase("A dog is hugging a cat.", ["dog", "cat"]) == "hugging"
    with pytest.raises(ImportError, match=r"dreamrelation\[nlp\]"):
        relation_phrase("A dog is hugging a cat.", backend="spacy")


@pytest.mark.parametrize("args, match", [
    (("",), "prompt"),
    ((None,), "prompt"),
    (("A dog.", "dog"), "subject_phrases"),
    (("A dog.", None, "nltk"), "backend"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        relation_phrase(*args)


# ------------------------------------------------------------------------------------ a fake spaCy
@dataclass
class Tok:
    text: str
    pos_: str
    dep_: str
    head_i: int
    i: int = 0
    doc: list = field(default_factory=list, repr=False)

    @property
    def head(self) -> Tok:
        return self.doc[self.head_i]


@dataclass
class Span:
    start: int
    end: int
    root: Tok


class Doc(list):
    noun_chunks: list[Span]


# hand-parsed as en_core_web_sm parses them: (text, pos, dep, head index); noun chunks as (start, end, root)
PARSES = {
    "A dog is hugging a cat.": (
        [("A", "DET", "det", 1), ("dog", "NOUN", "nsubj", 3), ("is", "AUX", "aux", 3),
         ("hugging", "VERB", "ROOT", 3), ("a", "DET", "det", 5), ("cat", "NOUN", "dobj", 3),
         (".", "PUNCT", "punct", 3)],
        [(0, 2, 1), (4, 6, 5)],
    ),
    "A lion and a polar bear hug.": (
        [("A", "DET", "det", 1), ("lion", "NOUN", "nsubj", 6), ("and", "CCONJ", "cc", 1), ("a", "DET", "det", 5),
         ("polar", "ADJ", "amod", 5), ("bear", "NOUN", "conj", 1), ("hug", "VERB", "ROOT", 6),
         (".", "PUNCT", "punct", 6)],
        [(0, 2, 1), (3, 6, 5)],
    ),
    "A fluffy dog is playing guitar on a park bench.": (
        [("A", "DET", "det", 2), ("fluffy", "ADJ", "amod", 2), ("dog", "NOUN", "nsubj", 4),
         ("is", "AUX", "aux", 4), ("playing", "VERB", "ROOT", 4), ("guitar", "NOUN", "dobj", 4),
         ("on", "ADP", "prep", 4), ("a", "DET", "det", 9), ("park", "NOUN", "compound", 9),
         ("bench", "NOUN", "pobj", 6), (".", "PUNCT", "punct", 4)],
        [(0, 3, 2), (5, 6, 5), (7, 10, 9)],
    ),
}


def fake_nlp(text: str) -> Doc:
    tokens, chunks = PARSES[text]
    doc = Doc()
    doc.extend(Tok(t, p, d, h, i, doc) for i, (t, p, d, h) in enumerate(tokens))
    doc.noun_chunks = [Span(s, e, doc[r]) for s, e, r in chunks]
    return doc


@pytest.fixture
def fake_spacy(monkeypatch):
    loaded: list[str] = []
    module = types.ModuleType("spacy")
    module.util = types.SimpleNamespace(is_package=lambda name: name == "en_core_web_md")

    def load(name):
        loaded.append(name)
        return fake_nlp

    module.load = load
    monkeypatch.setitem(sys.modules, "spacy", module)
    return loaded


@pytest.mark.parametrize("prompt, subjects, expected", [
    ("A dog is hugging a cat.", ["dog", "cat"], "hugging"),
    ("A dog is hugging a cat.", None, "hugging a cat"),  # subject = the nsubj chunk
    ("A lion and a polar bear hug.", ["lion", "polar bear"], "hug"),
    ("A lion and a polar bear hug.", None, "hug"),  # the conjunct of the subject goes too
    ("A fluffy dog is playing guitar on a park bench.", ["dog"], "playing guitar on a park bench"),  # whole chunk
    ("A fluffy dog is playing guitar on a park bench.", None, "playing guitar on a park bench"),
])
def test_spacy_backend(fake_spacy, prompt, subjects, expected):
    assert relation_phrase(prompt, subjects) == expected
    assert relation_phrase(prompt, subjects, backend="spacy") == expected
    assert fake_spacy == ["en_core_web_md"]  # the first installed pipeline, loaded once


def test_rules_backend_ignores_spacy(fake_spacy):
    assert relation_phrase("A dog is hugging a cat.", ["dog", "cat"], backend="rules") == "hugging"
    assert fake_spacy == []
