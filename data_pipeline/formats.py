"""Record formats the pipeline accepts, and the validation that decides what is quarantined and why.

Every rejection is a `BadRecord` with a stable machine-readable `reason` (counted in the manifest) and a
human-readable `detail` (written to the quarantine file next to the source file and line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Stable reason codes: they appear in manifests and quarantine files, so never rename one.
REASONS = (
    "not_utf8",
    "invalid_json",
    "oversize",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "empty_text",
    "bad_ranking",
    "duplicate_candidates",
    "negative_equals_positive",
    "too_few_negatives",
    "unknown_source",
    "prompt_budget",
)

class BadRecord(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ContrastiveRecord:
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    source: str | None
    instruction: str | None  # a per-record query instruction (FlagEmbedding's "prompt") overrides the table
    duplicate_negatives: int = 0  # repeated negatives dropped (real mined data has them; the record stays)


@dataclass(frozen=True)
class ListwiseRecord:
    query: str
    documents: tuple[str, ...]
    ranking: tuple[int, ...]  # 0-based document indices, teacher's best first
    source: str | None
    # graded records without a ranking: per document, its grade's level (0 = best grade). RankNet pairs only
    # documents on different levels, so tied grades add no pair. None = the ranking is a full order.
    levels: tuple[int, ...] | None = None


def decode_line(raw: bytes, max_record_bytes: int) -> dict[str, Any]:
    """Bytes of one JSONL line -> JSON object, or BadRecord."""
    if len(raw) > max_record_bytes:
        raise BadRecord("oversize", f"record is {len(raw)} bytes, limit is {max_record_bytes} (max_record_bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(
            "not_utf8", f"invalid UTF-8 at byte {e.start}: {raw[max(0, e.start - 8) : e.start + 8]!r}"
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord("invalid_json", f"{e.msg} at column {e.colno}") from None
    except RecursionError:  # json's decoder recurses per nesting level: a line of 3,000 '[' exhausts the stack
        raise BadRecord("invalid_json", "nested too deeply to decode") from None
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _text(obj: dict, key: str) -> str:
    if key not in obj or obj[key] is None:
        raise BadRecord("missing_field", f"field {key!r} is missing")
    v = obj[key]
    if not isinstance(v, str):
        raise BadRecord("wrong_type", f"field {key!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise BadRecord("empty_text", f"field {key!r} is empty")
    return v


def _texts(obj: dict, key: str, *, allow_empty_list: bool) -> tuple[str, ...]:
    if key not in obj or obj[key] is None:
        raise BadRecord("missing_field", f"field {key!r} is missing")
    v = obj[key]
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise BadRecord("wrong_type", f"field {key!r} must be a string or a list of strings, got {type(v).__name__}")
    if not items and not allow_empty_list:
        raise BadRecord("empty_text", f"field {key!r} is an empty list")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise BadRecord("wrong_type", f"{key}[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise BadRecord("empty_text", f"{key}[{i}] is empty")
    return tuple(items)


def _source(obj: dict) -> str | None:
    s = obj.get("source")
    if s is None:
        return None
    if not isinstance(s, str) or not s.strip():
        raise BadRecord("wrong_type", f"field 'source' must be a non-empty string, got {s!r}")
    return s


def parse_contrastive(obj: dict) -> ContrastiveRecord:
    """Accepts {query,pos,neg}, E5/echo {query,positive,negative} and FlagEmbedding {query,pos,neg,prompt,...}."""
    has_native = "pos" in obj or "neg" in obj
    has_echo = "positive" in obj or "negative" in obj
    if has_native and has_echo:
        raise BadRecord("wrong_type", "record mixes 'pos'/'neg' with 'positive'/'negative'; use one shape")
    pos_key, neg_key = ("positive", "negative") if has_echo else ("pos", "neg")
    query = _text(obj, "query")
    positives = _texts(obj, pos_key, allow_empty_list=False)
    negatives = _texts(obj, neg_key, allow_empty_list=True) if neg_key in obj else ()
    instruction = obj.get("instruction", obj.get("prompt"))
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise BadRecord("wrong_type", "field 'instruction'/'prompt' must be a non-empty string")
    pos_set = set(positives)
    clash = [i for i, n in enumerate(negatives) if n in pos_set]
    if clash:
        raise BadRecord("negative_equals_positive", f"{neg_key}{clash} repeat a positive text")
    unique = tuple(dict.fromkeys(negatives))
    return ContrastiveRecord(query, positives, unique, _source(obj), instruction, len(negatives) - len(unique))


def _relevance(obj: dict, n: int) -> tuple[float, ...]:
    rel = obj["relevance"]
    if not isinstance(rel, list) or not all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in rel):
        raise BadRecord("wrong_type", "field 'relevance' must be a list of numbers (a grade per document)")
    if len(rel) != n:
        raise BadRecord("bad_ranking", f"relevance has {len(rel)} grades for {n} documents")
    if any(g != g or g in (float("inf"), float("-inf")) for g in rel):
        raise BadRecord("wrong_type", "field 'relevance' holds NaN or infinity")
    if len(set(rel)) < 2:
        raise BadRecord("bad_ranking", f"every document has grade {rel[0]}: no pair to learn from")
    return tuple(float(g) for g in rel)


def parse_listwise(obj: dict) -> ListwiseRecord:
    """The released E2Rank format {query, document:[K], ranking:[1-based permutation, best first], source?}, or a
    graded record {query, document:[K], relevance:[grade per document], ranking?}: with grades only, RankNet learns
    from the pairs whose grades differ; with both, the ranking orders documents inside each grade and must agree
    with the grades."""
    query = _text(obj, "query")
    docs = _texts(obj, "document", allow_empty_list=False)
    if isinstance(obj["document"], str):
        raise BadRecord("wrong_type", "field 'document' must be a list of candidate strings")
    if len(docs) < 2:
        raise BadRecord("bad_ranking", f"a listwise record needs at least 2 documents, got {len(docs)}")
    has_rank = obj.get("ranking") is not None
    rel = _relevance(obj, len(docs)) if obj.get("relevance") is not None else None
    if not has_rank and rel is None:
        raise BadRecord("missing_field",
                        "field 'ranking' (a permutation) or 'relevance' (a grade per document) is missing")
    if has_rank:
        ranking = obj["ranking"]
        if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
            raise BadRecord("wrong_type", "field 'ranking' must be a list of integers")
        if sorted(ranking) != list(range(1, len(docs) + 1)):
            raise BadRecord(
                "bad_ranking", f"ranking {ranking} is not a permutation of 1..{len(docs)} (1-based document numbers)"
            )
    if len(set(docs)) != len(docs):
        seen: set[str] = set()
        dups = [i for i, d in enumerate(docs) if d in seen or seen.add(d)]
        raise BadRecord("duplicate_candidates", f"document{dups} repeat an earlier candidate")
    if has_rank:
        order = tuple(r - 1 for r in ranking)
        if rel is not None:
            for a, b in zip(order, order[1:]):
                if rel[a] < rel[b]:
                    raise BadRecord(
                        "bad_ranking",
                        f"ranking puts document {a + 1} (grade {rel[a]:g}) above document {b + 1} (grade {rel[b]:g})",
                    )
        return ListwiseRecord(query, docs, order, _source(obj))
    order = tuple(sorted(range(len(docs)), key=lambda i: -rel[i]))  # stable: ties keep the stored order
    grades = sorted(set(rel), reverse=True)
    return ListwiseRecord(query, docs, order, _source(obj), tuple(grades.index(g) for g in rel))
