"""The toy world's oracle on stored results: which manifest rows it can judge, and one stored image judged.

Shared by ``eval relationbench`` (:mod:`batch.evaluate`, its oracle metrics) and fit for ``batch judge``
(:mod:`batch.toy_judge`): a row is a toy-world question when its subjects' phrases read as toy identities
(``world.Identity.parse``) and its relation (``relation``, else ``metadata["toy_relation"]``) is a toy relation of
their number; a result image is read through ``manifests.storage`` (a path or any fsspec URL).
"""

from __future__ import annotations

import io

from PIL import Image

from dreamrelation.toy import oracle, world
from manifests import storage
from manifests.schema import GenerationRow

SOURCE = "toy-world"  # metadata["source"] of the rows `data toy-world` writes (== manifests.toy_data.SOURCE)
RELATION_IDS = frozenset(r.id for r in world.RELATIONS)

Question = tuple[tuple[world.Identity, ...], str]


def open_image(uri: str) -> Image.Image:
    """The RGB image stored at ``uri``."""
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        return im.convert("RGB")


def toy_question(row: GenerationRow | None, source: str | None = SOURCE) -> Question | None:
    """``(identities, relation id)`` the oracle can judge ``row``'s images against, or None when ``row`` is no
    toy-world row: ``metadata["source"]`` other than ``source`` (None: any), a phrase that is no toy identity, no
    toy relation, a relation of another arity, or two subjects of one colour (the oracle finds subjects by colour)."""
    if row is None or (source is not None and row.metadata.get("source") != source):
        return None
    relation = row.relation if row.relation in RELATION_IDS else row.metadata.get("toy_relation")
    return question_of([s.phrase for s in row.subjects], relation)


def question_of(phrases: list[str], relation: str | None) -> Question | None:
    """``(identities, relation id)`` when ``phrases`` read as toy identities of distinct colours and ``relation``
    is a toy relation of their number, else None."""
    if relation not in RELATION_IDS:
        return None
    try:
        identities = tuple(world.Identity.parse(p) for p in phrases)
    except ValueError:
        return None
    if len(identities) != world.relation(relation).arity or len({i.colour for i in identities}) != len(identities):
        return None
    return identities, relation


def judge_uri(uri: str, question: Question) -> oracle.Verdict:
    """The oracle's verdict on the image at ``uri`` for ``question`` (:func:`toy_question`)."""
    identities, relation = question
    return oracle.judge(open_image(uri), identities, relation)
