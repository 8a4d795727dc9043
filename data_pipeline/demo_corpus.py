"""A small synthetic retrieval world the project ships by generating it: fictional species with attributes.

Queries ask for one attribute of one species; the positive passage states it; hard negatives state another
attribute of the same species or the same attribute of a similar species. The listwise slates carry teacher
grades (exact > same species > same attribute > unrelated), so both stages have something to learn.
Deterministic from the seed; writes JSONL in the pipeline's input formats and a BEIR-style held-out split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYLLABLES = ["vel", "mor", "ka", "lin", "dra", "sor", "bex", "tal", "qui", "ron", "fen", "zu", "pa", "mir", "gor", "lo"]
KINDS = ["beetle", "heron", "lizard", "moth", "otter", "finch", "newt", "bat"]
ATTRIBUTES = {
    "diet": (
        "What does the {n} eat?",
        "The {n} feeds mainly on {v}.",
        [
            "ripe figs",
            "small snails",
            "pine seeds",
            "river algae",
            "night moths",
            "fallen acorns",
            "reed shoots",
            "cave crickets",
        ],
    ),
    "habitat": (
        "Where does the {n} live?",
        "The {n} is found in {v}.",
        [
            "salt marshes",
            "high cloud forests",
            "limestone caves",
            "desert canyons",
            "mangrove swamps",
            "alpine meadows",
            "coral islands",
            "bamboo groves",
        ],
    ),
    "color": (
        "What color is the {n}?",
        "Adult {n}s are {v} in color.",
        [
            "deep crimson",
            "pale silver",
            "olive green",
            "jet black",
            "bright amber",
            "speckled blue",
            "dusty brown",
            "pearl white",
        ],
    ),
    "lifespan": (
        "How long does the {n} live?",
        "A {n} usually lives for {v}.",
        [
            "two summers",
            "about nine years",
            "roughly forty days",
            "over a century",
            "six to eight months",
            "nearly twenty years",
            "three winters",
            "around fifteen years",
        ],
    ),
    "discovery": (
        "Who first described the {n}?",
        "The {n} was first described by {v}.",
        [
            "Ada Morrow in 1871",
            "the Lund expedition of 1902",
            "Felix Orban in 1799",
            "a survey team in 1954",
            "Ines Castel in 1833",
            "the naturalist Ko Ren in 1911",
            "Maren Holt in 1768",
            "students of the Vell academy in 1990",
        ],
    ),
}
FILLER = [
    "Local guides often mention it to visitors.",
    "Field notes on it are kept in several museums.",
    "It is rarely seen during the day.",
    "Its numbers have been stable for decades.",
    "Photographs of it are prized by collectors.",
    "It appears in a few old folk songs.",
]


def _species(rng: random.Random, n: int) -> list[dict]:
    names, out = set(), []
    while len(out) < n:
        name = (rng.choice(SYLLABLES) + rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize()
        full = f"{name} {rng.choice(KINDS)}"
        if full in names:
            continue
        names.add(full)
        out.append({"name": full, **{a: rng.choice(vals) for a, (_, _, vals) in ATTRIBUTES.items()}})
    return out


def _passage(rng: random.Random, sp: dict, attr: str) -> str:
    return ATTRIBUTES[attr][1].format(n=sp["name"], v=sp[attr]) + " " + rng.choice(FILLER)


def _grade(q: tuple[int, str], p: tuple[int, str]) -> int:
    """The teacher's grade of passage p for the query about q: 3 exact, 2 same species, 1 same attribute, 0 other."""
    return 3 if p == q else 2 if p[0] == q[0] else 1 if p[1] == q[1] else 0


def generate(out_dir: str | Path, *, species: int = 120, seed: int = 0, slate: int = 12, eval_fraction: float = 0.2):
    """Write contrastive.jsonl, listwise.jsonl (train) and eval/{corpus,queries}.jsonl + qrels/test.tsv."""
    rng = random.Random(seed)
    out = Path(out_dir)
    (out / "eval" / "qrels").mkdir(parents=True, exist_ok=True)
    sps = _species(rng, species)
    docs: dict[tuple[int, str], str] = {(i, a): _passage(rng, s, a) for i, s in enumerate(sps) for a in ATTRIBUTES}
    pairs = [(i, a) for i in range(len(sps)) for a in ATTRIBUTES]
    rng.shuffle(pairs)
    n_eval = int(len(pairs) * eval_fraction)
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]

    def query(i, a):
        return ATTRIBUTES[a][0].format(n=sps[i]["name"])

    def slate_for(i, a):
        same_sp = [(i, b) for b in ATTRIBUTES if b != a]
        same_attr = [(j, a) for j in rng.sample(range(len(sps)), 6) if j != i][:4]
        pool = [p for p in [(i, a)] + same_sp + same_attr]
        while len(pool) < slate:
            p = (rng.randrange(len(sps)), rng.choice(list(ATTRIBUTES)))
            if p not in pool:
                pool.append(p)
        return pool[:slate]  # best first: exact, same species, same attribute, unrelated

    with open(out / "contrastive.jsonl", "w") as f:
        for i, a in train_pairs:
            negs = [docs[(i, b)] for b in rng.sample([b for b in ATTRIBUTES if b != a], 2)]
            negs += [docs[(j, a)] for j in rng.sample([j for j in range(len(sps)) if j != i], 2)]
            f.write(json.dumps({"query": query(i, a), "pos": docs[(i, a)], "neg": negs, "source": "demo"}) + "\n")
    with open(out / "listwise.jsonl", "w") as f:
        for i, a in train_pairs:
            pool = slate_for(i, a)
            rng.shuffle(pool)  # stored order is random
            # graded, not a permutation: the order inside a grade is arbitrary, so a full ranking would teach
            # RankNet ~15 of its 66 pairs at random; grades add no pair between equals
            grades = [_grade((i, a), p) for p in pool]
            f.write(
                json.dumps({"query": query(i, a), "document": [docs[p] for p in pool], "relevance": grades,
                            "source": "demo"})
                + "\n"
            )
    with open(out / "eval" / "corpus.jsonl", "w") as f:
        for (i, a), text in sorted(docs.items()):
            f.write(json.dumps({"_id": f"d{i}-{a}", "title": "", "text": text}) + "\n")
    with open(out / "eval" / "queries.jsonl", "w") as f, open(out / "eval" / "qrels" / "test.tsv", "w") as q:
        q.write("query-id\tcorpus-id\tscore\n")
        for k, (i, a) in enumerate(eval_pairs):
            f.write(json.dumps({"_id": f"q{k}", "text": query(i, a)}) + "\n")
            q.write(f"q{k}\td{i}-{a}\t2\n")
            for b in ATTRIBUTES:
                if b != a:
                    q.write(f"q{k}\td{i}-{b}\t1\n")
    return {"train": len(train_pairs), "eval": len(eval_pairs), "docs": len(docs)}
