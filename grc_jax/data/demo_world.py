"""The built-in demo world: a small synthetic world of invented people for end-to-end GRC runs.

Every person has a home city, a profession, a favourite colour, a pet and a mentor (one of
a few senior people of the same split). One short document per person states these facts.
From the world we write training records for all three GRC objectives (generative,
representative, compressive) and for self-reasoning (multi-hop queries whose reasoning names
the bridge person), a held-out split whose people never appear in any train file, multi-hop
evaluation queries, retrieval corpora and a small byte-level BPE tokenizer.

    python -m grc_jax.data.demo_world --out /tmp/demo_world --seed 0

or, from Python, ``write_demo_world("/tmp/demo_world", seed=0)`` (``build_world`` gives the same
world as Python objects, attributes included). The output is byte-identical for the same
arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from grc_jax.errors import UserError, report_user_errors

# Fixed low ids: <pad> must be 0 for the padding masks downstream.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<|end_of_reasoning|>")
# Inclusive bounds on a document's token count (no special tokens). Short documents keep a
# record (query, three documents, question) near 200 tokens, so CPU training steps stay cheap.
DOC_TOKEN_BUDGET: tuple[int, int] = (16, 48)
DEFAULT_NUM_ENTITIES = 960
DEFAULT_NUM_HELDOUT = 48  # the held-out people every figure of the tiny demo is measured on
DEFAULT_VOCAB_SIZE = 640
# Share of train people who are subjects of multi-hop queries, and share of those whose
# multi-hop queries go to multihop_eval.jsonl instead of train.
MULTIHOP_SUBJECT_FRACTION = 0.15
MULTIHOP_EVAL_FRACTION = 0.2
TEXT_REPEATS = 16
# Mentors are a few senior people of each split, each mentoring about this many: a multi-hop
# bridge is then one of a few dozen well-known names, and recalling it means learning which
# one, not spelling out one of hundreds of random names.
MENTEES_PER_MENTOR = 24
MIN_SPLIT_SIZE = 4  # every record needs at least 3 other documents of its split as negatives
NEGATIVES_RANGE = (3, 7)
QA_PER_ENTITY = 2  # records with a direct query and a question, per person
MULTIHOP_PER_ENTITY = 2

FILES: dict[str, str] = {
    "train": "train.jsonl",
    "heldout": "heldout.jsonl",
    "multihop_eval": "multihop_eval.jsonl",
    "corpus_train": "corpus_train.jsonl",
    "corpus_heldout": "corpus_heldout.jsonl",
    "world": "world.json",
    "tokenizer": "tokenizer.json",
}

# Names are 2-3 of these. The tokenizer splits names at syllables (see `pre_tokenizer`), and
# held-out names use only syllables seen at the same position in train names, so every token of
# a held-out name is one the model trains on. No template word may end in 1-2 syllables after
# another letter ("tor" would split "mentor"); `check_pre_tokenizer` enforces that.
SYLLABLES: tuple[str, ...] = (
    "ba", "bel", "da", "dor", "el", "fen", "ga", "gal", "ka", "kel", "li", "lo", "ma", "mir",
    "mo", "na", "nor", "pa", "qui", "ra", "ren", "ri", "sa", "sel", "shu", "ta", "tha", "tul",
    "du", "va", "vak", "ven", "wy", "xan", "yo", "za", "zor", "bri", "hal", "ost",
)  # fmt: skip
# The inventories are pairwise disjoint and their words are not used elsewhere in the templates,
# so the attribute values mentioned in a text can be recovered by a word search.
CITIES: tuple[str, ...] = (
    "Quarn", "Velmark", "Ostrum", "Dunmere", "Hollin", "Pesk", "Tavik", "Ulmar", "Brisca",
    "Kaldun", "Myrrow", "Sennet",
)  # fmt: skip
PROFESSIONS: tuple[str, ...] = (
    "potter", "baker", "sailor", "weaver", "smith", "miner", "healer", "farmer", "painter",
    "scribe", "hunter", "tailor",
)  # fmt: skip
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "purple", "orange", "white", "grey")
PETS: tuple[str, ...] = ("owl", "cat", "dog", "goat", "parrot", "fox", "hare", "tortoise")
ATTRIBUTES: tuple[str, ...] = ("city", "profession", "colour", "pet")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "city": CITIES,
    "profession": PROFESSIONS,
    "colour": COLOURS,
    "pet": PETS,
}
# Every person has a distinct attribute tuple (so the full set identifies them): no more people.
MAX_ENTITIES = int(np.prod([len(v) for v in ATTRIBUTE_VALUES.values()]))

# Document sentences: several phrasings per fact, so documents differ in shape and not only in
# their slot values. Documents are short and name their person twice only: a memory of K
# latents is read faster when the attribute words are a large share of its text (answering
# from memory learned about twice as fast as with 40-token documents that repeat the name).
# The mentor sentence has one phrasing only, the same as the multi-hop reasoning:
# self-reasoning then recalls a sentence the model has read, instead of inverting
# "X is the mentor of Y" (which language models notoriously fail to do).
_INTRO = (
    "{n} is {a_profession} from {city}.",
    "Meet {n}, {a_profession} from {city}.",
    "{n} works as {a_profession} in {city}.",
)
_FACTS: dict[str, tuple[str, ...]] = {
    "colour": ("Favourite colour: {colour}.", "Likes {colour} best.", "Loves the colour {colour}."),
    "pet": ("Keeps {a_pet} as a pet.", "Has {a_pet} at home.", "Pet: {a_pet}."),
    "mentor": ("The mentor of {n} is {mentor}.",),
}

# Questions about one attribute of a named person (memory QA, and the resolved multi-hop step).
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "city": ("Where does {n} live?", "What is the home city of {n}?"),
    "profession": ("What does {n} do for a living?", "What is the profession of {n}?"),
    "colour": ("What is the favourite colour of {n}?", "Which colour does {n} like best?"),
    "pet": ("What pet does {n} keep?", "What kind of pet does {n} have?"),
}
_DESCRIBE = ("Tell me about {n}.", "What do you know about {n}?")
_NAME_QUERIES = ("Who is {n}?", "Find {n}.")
# Multi-hop queries name only the subject; the bridge (the mentor) must be found by reasoning.
_MULTIHOP_QUERIES: dict[str, tuple[str, ...]] = {
    "city": ("Where does the mentor of {n} live?", "What is the home city of the mentor of {n}?"),
    "profession": (
        "What does the mentor of {n} do for a living?",
        "What is the profession of the mentor of {n}?",
    ),
    "colour": (
        "What is the favourite colour of the mentor of {n}?",
        "Which colour does the mentor of {n} like best?",
    ),
    "pet": (
        "What pet does the mentor of {n} keep?",
        "What kind of pet does the mentor of {n} have?",
    ),
}
_REASONING = "The mentor of {n} is {mentor}."

DESCRIPTION = (
    "A synthetic world of invented people whose names are built from a fixed syllable "
    "inventory. Each person has a home city, a profession, a favourite colour, a pet and a "
    "mentor (one of a few senior people of the same split, each mentoring about 24), stated "
    "in one short document per person. "
    "Every train.jsonl record but the text ones feeds all three losses: a query (a direct "
    "attribute query that identifies one person, or the person's name), the positive document "
    "with hard negatives (also the reader's distractor memories), and a question answered "
    "from the positive's memory (one attribute, or the whole document for a by-name query). "
    "Multi-hop records (a query about the mentor of a person, reasoning that names the "
    "mentor, the mentor's document as positive and the resolved question/answer) cover 15% "
    "of the train people, whose documents also come as repeated text records so that their "
    "mentors are learned by heart. heldout.jsonl holds attribute queries and questions over "
    "held-out people, who appear in no train file and relate only to each other. "
    "multihop_eval.jsonl holds the multi-hop queries of 20% of the multi-hop subjects, kept "
    "out of train.jsonl. The tokenizer is a byte-level BPE whose pre-tokenizer cuts names into "
    "syllables; held-out names use only syllables seen in train names, so every token of the "
    "held-out files also occurs in train.jsonl."
)


@dataclasses.dataclass(frozen=True)
class Entity:
    """One invented person; `split` is "train" or "heldout"."""

    name: str
    split: str
    city: str
    profession: str
    colour: str
    pet: str
    mentor: str

    def attribute(self, kind: str) -> str:
        return getattr(self, kind)

    @property
    def values(self) -> tuple[str, str, str, str]:
        """The attribute values, in `ATTRIBUTES` order."""
        return (self.city, self.profession, self.colour, self.pet)


@dataclasses.dataclass
class World:
    """Everything `write_demo_world` writes, as Python objects."""

    seed: int
    num_heldout: int
    entities: list[Entity]
    documents: dict[str, str]  # person name -> document
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    multihop_eval: list[dict[str, Any]]
    tokenizer: Tokenizer

    def split(self, split: str) -> list[Entity]:
        return [e for e in self.entities if e.split == split]


def record_kind(record: dict[str, Any]) -> str:
    """The shape of a demo-world record: multihop, retrieval_qa (a direct query and a question
    about its positive) or text."""
    if "reasoning" in record:
        return "multihop"
    if "query" in record:
        return "retrieval_qa"
    return "text"


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _slots(e: Entity) -> dict[str, str]:
    return {
        "n": e.name,
        "city": e.city,
        "profession": e.profession,
        "a_profession": _article(e.profession),
        "colour": e.colour,
        "pet": e.pet,
        "a_pet": _article(e.pet),
        "mentor": e.mentor,
    }


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Byte-level pre-tokenization that also cuts names into their syllables.

    A name is a capitalised syllable followed by 1-2 lowercase syllables, as a whole word. Each
    syllable becomes its own pre-token, and the space before a name its own "Ġ" token, so a
    name's tokens are the same wherever it occurs and BPE can never merge a whole name into one
    token that only that name (maybe a held-out one) uses.
    """
    by_length = sorted(SYLLABLES, key=len, reverse=True)  # longest first: "bel" before "be"
    first = "|".join(s.capitalize() for s in by_length)
    rest = "|".join(by_length)
    pattern = (
        f"(?<![A-Za-z])(?:{first})(?=(?:{rest}){{1,2}}(?![A-Za-z]))"  # first syllable of a name
        f"|(?<=[a-z])(?:{rest})(?=(?:{rest})?(?![A-Za-z]))"  # a later syllable of a name
    )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def name_pieces(name: str, pre: pre_tokenizers.PreTokenizer | None = None) -> list[str]:
    """The syllable pieces `pre_tokenizer` cuts `name` into."""
    return [piece for piece, _ in (pre or pre_tokenizer()).pre_tokenize_str(name)]


def _template_words() -> list[str]:
    # Everything but the names: templates, direct-query pieces and attribute values.
    texts = [*_INTRO, *_DESCRIBE, *_NAME_QUERIES, _REASONING, "Who is Find the person from who keeps whose and"]
    for group in (_FACTS, _QUESTIONS, _MULTIHOP_QUERIES):
        texts += [t for ts in group.values() for t in ts]
    texts += [v for values in ATTRIBUTE_VALUES.values() for v in values]
    words = {w for t in texts for w in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", t))}
    return sorted(words | {w.capitalize() for w in words})


def check_pre_tokenizer() -> None:
    """Raises if the name rule of `pre_tokenizer` would cut an ordinary word of the templates."""
    pre = pre_tokenizer()
    cut = [w for w in _template_words() if len(pre.pre_tokenize_str(" " + w)) != 1]
    if cut:
        raise ValueError(f"template words look like names to the pre-tokenizer: {cut}")


def _new_name(
    rng: random.Random, taken: list[str], pre: pre_tokenizers.PreTokenizer, pieces: set[str] | None
) -> str | None:
    """A random name, or None if it breaks a rule.

    Rules: no name is a substring of another name or a city (or vice versa), which makes "does
    this name occur in this text" a plain search; and if `pieces` is given, the name consists of
    those pre-tokens only. `taken` holds the lowercase names drawn so far.
    """
    name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
    low = name.lower()
    reserved = [c.lower() for c in CITIES]
    if any(low in other or other in low for other in taken + reserved):
        return None
    if pieces is not None and not set(name_pieces(name, pre)) <= pieces:
        return None
    return name


def _make_names(rng: random.Random, count: int, taken: list[str], pieces: set[str] | None = None) -> list[str]:
    pre = pre_tokenizer()
    names: list[str] = []
    for _ in range(1000 * count):
        if len(names) == count:
            break
        name = _new_name(rng, taken, pre, pieces)
        if name is not None:
            taken.append(name.lower())
            names.append(name)
    if len(names) < count:
        raise UserError(f"could only draw {len(names)} of {count} names; try a larger world")
    return names


def _make_attributes(rng: random.Random, count: int) -> list[tuple[str, ...]]:
    # Unique tuples guarantee that the full attribute set identifies a person, so a uniquely
    # identifying direct query always exists.
    seen: set[tuple[str, ...]] = set()
    out: list[tuple[str, ...]] = []
    while len(out) < count:
        t = tuple(rng.choice(ATTRIBUTE_VALUES[kind]) for kind in ATTRIBUTES)
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _make_entities(
    rng: random.Random, names: Sequence[str], attrs: Sequence[tuple[str, ...]], split: str
) -> list[Entity]:
    entities = []
    # Mentors come from the same split (held-out people relate only to held-out people), from
    # its first people: names are drawn in random order, so that is a random few.
    mentors = range(max(2, round(len(names) / MENTEES_PER_MENTOR)))
    for i, name in enumerate(names):
        mentor = names[rng.choice([j for j in mentors if j != i])]
        entities.append(Entity(name, split, *attrs[i], mentor=mentor))
    return entities


def _document(rng: random.Random, e: Entity) -> str:
    """The intro (name, profession, city), then the other facts in a random order."""
    facts = list(_FACTS)
    rng.shuffle(facts)
    sentences = [rng.choice(_INTRO)] + [rng.choice(_FACTS[f]) for f in facts]
    return " ".join(s.format(**_slots(e)) for s in sentences)


class _Population:
    """The people of one split, as arrays: ranking everyone for every record stays fast for
    thousands of people."""

    def __init__(self, people: Sequence[Entity]):
        self.people = list(people)
        self.index = {e.name: i for i, e in enumerate(self.people)}
        self.attrs = np.array([[ATTRIBUTE_VALUES[k].index(v) for k, v in zip(ATTRIBUTES, e.values)] for e in people])
        self.mentor = np.array([self.index[e.mentor] for e in self.people])

    def identifying_attributes(self, rng: random.Random, e: Entity) -> list[str]:
        """A smallest set of attributes of `e` that no other person of the split shares."""
        i = self.index[e.name]
        # Bit j of agree[m] says whether person m shares attribute j with e; a set of attributes
        # (a bit mask) identifies e if no other person agrees on all of it.
        agree = (self.attrs == self.attrs[i]) @ (1 << np.arange(len(ATTRIBUTES)))
        agree = np.delete(agree, i)
        masks = [m for m in range(1, 1 << len(ATTRIBUTES)) if not np.any((agree & m) == m)]
        if not masks:  # unreachable: attribute tuples are unique
            raise AssertionError(f"no identifying attribute set for {e.name}")
        # The fewest attributes that suffice make the shortest, clearest queries.
        fewest = min(m.bit_count() for m in masks)
        mask = rng.choice([m for m in masks if m.bit_count() == fewest])
        return [k for j, k in enumerate(ATTRIBUTES) if mask >> j & 1]

    def hard_negatives(self, rng: random.Random, target: Entity, exclude: Iterable[str] = ()) -> list[str]:
        """Names of 3-7 people whose documents look most like the target's: most shared
        attributes, plus one for a mentor link (mentor, mentee or same mentor)."""
        t = self.index[target.name]
        score = (self.attrs == self.attrs[t]).sum(axis=1)
        everyone = np.arange(len(self.people))
        score += (self.mentor == t) | (self.mentor == self.mentor[t]) | (everyone == self.mentor[t])
        for name in [target.name, *exclude]:
            score[self.index[name]] = -1
        # Random tie-breaking, from the world's seeded generator.
        ties = np.random.default_rng(rng.getrandbits(64)).random(len(self.people))
        order = np.lexsort((ties, -score))  # the last key sorts first
        k = rng.randint(*NEGATIVES_RANGE)
        return [self.people[i].name for i in order[:k] if score[i] >= 0]


def _direct_query(rng: random.Random, e: Entity, population: _Population) -> str:
    """A query naming a few attributes of `e` that identify it within its split."""
    kinds = population.identifying_attributes(rng, e)
    text = "the " + (e.profession if "profession" in kinds else "person")
    if "city" in kinds:
        text += f" from {e.city}"
    clauses = []
    if "pet" in kinds:
        clauses.append(f"who keeps {_article(e.pet)}")
    if "colour" in kinds:
        clauses.append(f"whose favourite colour is {e.colour}")
    if clauses:
        text += " " + " and ".join(clauses)
    return rng.choice((f"Who is {text}?", f"Find {text}."))


def _record(**fields: Any) -> dict[str, Any]:
    # One fixed key order for every record, so files are stable and easy to read.
    order = ("query", "reasoning", "positive", "negatives", "question", "answer", "text")
    return {k: fields[k] for k in order if k in fields}


# Records are first built with person names in place of documents (positive, negatives, text),
# because documents are only final once the tokenizer has fitted them to the token budget.
def _retrieval_and_qa(
    rng: random.Random, e: Entity, pop: _Population, documents: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Records that feed all three losses at once: a direct query for `e`, its document with
    hard negatives, and a question about one attribute, answered from the document's memory.

    With `documents` (training), one more record looks `e` up by name and asks the reader to
    tell everything about `e`: its answer is the whole document, a reconstruction from the
    right memory among distractors. It teaches embeddings and memories to keep the name, which
    multi-hop retrieval (reasoning names the bridge) and answering among distractors need."""
    out = [
        _record(
            query=_direct_query(rng, e, pop),
            positive=e.name,
            negatives=pop.hard_negatives(rng, e),
            question=rng.choice(_QUESTIONS[kind]).format(n=e.name),
            answer=e.attribute(kind),
        )
        for kind in rng.sample(list(_QUESTIONS), QA_PER_ENTITY)
    ]
    if documents is not None:
        out.append(
            _record(
                query=rng.choice(_NAME_QUERIES).format(n=e.name),
                positive=e.name,
                negatives=pop.hard_negatives(rng, e),
                question=rng.choice(_DESCRIBE).format(n=e.name),
                answer=documents[e.name],
            )
        )
    return out


def _multihop(rng: random.Random, e: Entity, pop: _Population) -> list[dict[str, Any]]:
    bridge = pop.people[pop.index[e.mentor]]
    out = []
    for kind in rng.sample(list(_MULTIHOP_QUERIES), MULTIHOP_PER_ENTITY):
        # The subject's own document names both the subject and the bridge: the hardest
        # negative for a retriever that only matches the query's words.
        negatives = [e.name] + pop.hard_negatives(rng, bridge, exclude=[e.name])
        out.append(
            _record(
                query=rng.choice(_MULTIHOP_QUERIES[kind]).format(n=e.name),
                reasoning=_REASONING.format(n=e.name, mentor=bridge.name),
                positive=bridge.name,
                negatives=negatives[: NEGATIVES_RANGE[1]],
                question=rng.choice(_QUESTIONS[kind]).format(n=bridge.name),
                answer=bridge.attribute(kind),
            )
        )
    return out


def _resolve(records: list[dict[str, Any]], documents: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for rec in records:
        rec = dict(rec)
        for key in ("positive", "text"):
            if key in rec:
                rec[key] = documents[rec[key]]
        if "negatives" in rec:
            rec["negatives"] = [documents[n] for n in rec["negatives"]]
        out.append(rec)
    return out


def _record_strings(records: Iterable[dict[str, Any]], documents: dict[str, str]) -> list[str]:
    """The distinct strings the model reads in these (unresolved) records, documents included.

    Each document counts once: the tokenizer should not weigh a document by how often it is
    drawn as a negative.
    """
    texts: dict[str, None] = {}  # insertion-ordered set, for a deterministic tokenizer corpus
    for rec in records:
        for key in ("query", "reasoning", "question", "answer"):
            if key in rec:
                texts[rec[key]] = None
        for name in [rec.get("positive"), rec.get("text"), *rec.get("negatives", [])]:
            if name is not None:
                texts[documents[name]] = None
    return list(texts)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE over `pre_tokenizer`: lossless round trip for any text."""
    check_pre_tokenizer()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise AssertionError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def build_world(
    seed: int = 0,
    num_entities: int = DEFAULT_NUM_ENTITIES,
    num_heldout: int = DEFAULT_NUM_HELDOUT,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> World:
    """Generates the world, its records and its tokenizer in memory (deterministic)."""
    num_train = num_entities - num_heldout
    if num_entities > MAX_ENTITIES:
        raise UserError(
            f"num_entities={num_entities}: the demo world has at most {MAX_ENTITIES} people "
            f"(one per distinct attribute tuple)"
        )
    if min(num_heldout, num_train) < MIN_SPLIT_SIZE:
        raise UserError(
            f"num_entities={num_entities} with num_heldout={num_heldout} leaves a split "
            f"with fewer than {MIN_SPLIT_SIZE} people"
        )
    rng = random.Random(seed)
    attrs = _make_attributes(rng, num_entities)
    taken: list[str] = []
    train_names = _make_names(rng, num_train, taken)
    # Held-out names reuse train syllables (as pre-tokens, so "Bel" as a first syllable and "bel"
    # later are told apart): no held-out name needs a token that train.jsonl lacks.
    pre = pre_tokenizer()
    train_pieces = {p for name in train_names for p in name_pieces(name, pre)}
    heldout_names = _make_names(rng, num_heldout, taken, train_pieces)
    train_people = _make_entities(rng, train_names, attrs[:num_train], "train")
    heldout_people = _make_entities(rng, heldout_names, attrs[num_train:], "heldout")
    documents = {e.name: _document(rng, e) for e in train_people + heldout_people}

    train_pop, heldout_pop = _Population(train_people), _Population(heldout_people)
    # Multi-hop is about a few "well-known" people: their documents also come as plain text,
    # TEXT_REPEATS times, so the model learns their mentors by heart (self-reasoning recalls
    # them). Everyone else is seen a few times only, so that answering from memory and
    # retrieval cannot lean on facts memorised about the training people.
    subjects = rng.sample(train_people, max(2, round(num_train * MULTIHOP_SUBJECT_FRACTION)))
    num_eval = max(1, round(len(subjects) * MULTIHOP_EVAL_FRACTION))
    eval_subjects = {e.name for e in subjects[:num_eval]}
    train: list[dict[str, Any]] = []
    multihop_eval: list[dict[str, Any]] = []
    for e in train_people:
        train += _retrieval_and_qa(rng, e, train_pop, documents)
    for e in subjects:
        hops = _multihop(rng, e, train_pop)
        (multihop_eval if e.name in eval_subjects else train).extend(hops)
        train += [_record(text=e.name)] * TEXT_REPEATS
    heldout: list[dict[str, Any]] = []
    for e in heldout_people:
        heldout += _retrieval_and_qa(rng, e, heldout_pop)

    tok = train_tokenizer(_record_strings(train + multihop_eval + heldout, documents), vocab_size)
    lengths = [len(tok.encode(d).ids) for d in documents.values()]
    lo, hi = DOC_TOKEN_BUDGET
    if not lo <= min(lengths) <= max(lengths) <= hi:
        raise ValueError(
            f"document lengths {min(lengths)}..{max(lengths)} tokens fall outside the budget "
            f"{lo}..{hi}; try another vocab_size (now {vocab_size})"
        )
    # Mix record kinds so that every stretch of the file feeds all objectives.
    for records in (train, heldout, multihop_eval):
        rng.shuffle(records)
    return World(
        seed=seed,
        num_heldout=num_heldout,
        entities=train_people + heldout_people,
        documents=documents,
        train=_resolve(train, documents),
        heldout=_resolve(heldout, documents),
        multihop_eval=_resolve(multihop_eval, documents),
        tokenizer=tok,
    )


def _write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_demo_world(
    out_dir: str,
    seed: int = 0,
    num_entities: int = DEFAULT_NUM_ENTITIES,
    num_heldout: int = DEFAULT_NUM_HELDOUT,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> dict[str, Any]:
    """Builds the demo world and writes its files into `out_dir`; returns paths and counts."""
    return write_world(build_world(seed, num_entities, num_heldout, vocab_size), out_dir)


def write_world(world: World, out_dir: str) -> dict[str, Any]:
    """Writes the files of a built world into `out_dir`; returns their paths and the counts."""
    tok = world.tokenizer
    os.makedirs(out_dir, exist_ok=True)
    paths = {key: os.path.join(out_dir, name) for key, name in FILES.items()}
    _write_jsonl(paths["train"], world.train)
    _write_jsonl(paths["heldout"], world.heldout)
    _write_jsonl(paths["multihop_eval"], world.multihop_eval)
    for split in ("train", "heldout"):
        corpus = [{"id": e.name, "text": world.documents[e.name]} for e in world.split(split)]
        _write_jsonl(paths[f"corpus_{split}"], corpus)
    tok.save(paths["tokenizer"])

    counts: dict[str, Any] = {
        "entities_train": len(world.split("train")),
        "entities_heldout": len(world.split("heldout")),
    }
    for key in ("train", "heldout", "multihop_eval"):
        records = getattr(world, key)
        kinds = [record_kind(r) for r in records]
        counts[key] = {"records": len(records), **{k: kinds.count(k) for k in sorted(set(kinds))}}
    lengths = [len(tok.encode(d).ids) for d in world.documents.values()]
    doc_tokens = {
        "min": min(lengths),
        "max": max(lengths),
        "mean": round(sum(lengths) / len(lengths), 2),
    }
    meta = {
        "name": "grc_jax demo world",
        "description": DESCRIPTION,
        "generator": "grc_jax.data.demo_world",
        "seed": world.seed,
        "num_entities": len(world.entities),
        "num_heldout": world.num_heldout,
        "multihop_eval_fraction": MULTIHOP_EVAL_FRACTION,
        "counts": counts,
        "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
        "vocab_size": tok.get_vocab_size(),
        "doc_token_budget": {"min": DOC_TOKEN_BUDGET[0], "max": DOC_TOKEN_BUDGET[1]},
        "doc_tokens": doc_tokens,
        "attributes": {k: list(v) for k, v in ATTRIBUTE_VALUES.items()},
        "relation": "mentor",
        "files": dict(FILES),
    }
    with open(paths["world"], "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return {"out_dir": out_dir, "files": paths, "counts": counts, "doc_tokens": doc_tokens}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the grc_jax synthetic demo world.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-entities", type=int, default=DEFAULT_NUM_ENTITIES)
    parser.add_argument("--num-heldout", type=int, default=DEFAULT_NUM_HELDOUT)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    info = write_demo_world(args.out, args.seed, args.num_entities, args.num_heldout, args.vocab_size)
    print(json.dumps({k: info[k] for k in ("out_dir", "counts", "doc_tokens")}, indent=2))


if __name__ == "__main__":
    report_user_errors(main)()
