"""Per-source instruction table: data in YAML, validated at load so that a bad table fails before any work."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BUNDLED = Path(__file__).with_name("instructions.yaml")


class InstructionError(ValueError):
    pass


@dataclass(frozen=True)
class Instructions:
    query: tuple[str, ...]  # several alternate per record (LLM2Vec style for NLI and Quora)
    rerank: str

    def query_for(self, text: str) -> str:
        if len(self.query) == 1:
            return self.query[0]
        h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")
        return self.query[h % len(self.query)]


def _entry(where: str, raw) -> Instructions:
    if not isinstance(raw, dict):
        raise InstructionError(f"{where}: expected a mapping with 'query' and 'rerank'")
    extra = set(raw) - {"query", "rerank"}
    if extra:
        raise InstructionError(f"{where}: unknown key(s) {sorted(extra)}")
    q = raw.get("query")
    qs = [q] if isinstance(q, str) else q
    if not isinstance(qs, list) or not qs or not all(isinstance(s, str) and s.strip() for s in qs):
        raise InstructionError(f"{where}.query must be a non-empty string or list of non-empty strings")
    r = raw.get("rerank")
    if not isinstance(r, str) or not r.strip():
        raise InstructionError(f"{where}.rerank must be a non-empty string")
    return Instructions(tuple(s.strip() for s in qs), r.strip())


@dataclass(frozen=True)
class InstructionTable:
    default: Instructions
    sources: dict[str, Instructions]
    aliases: dict[str, str] = field(default_factory=dict)  # another dataset's key -> ours (official E2Rank keys)

    @classmethod
    def load(cls, path: str | Path | None = None) -> InstructionTable:
        p = Path(path) if path else BUNDLED
        if not p.is_file():
            raise InstructionError(f"instruction table {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise InstructionError(f"instruction table {p} is not valid YAML: {e}") from e
        if not isinstance(raw, dict) or set(raw) - {"default", "sources", "aliases"} or "default" not in raw:
            raise InstructionError(f"{p}: top level must have 'default' and optionally 'sources' and 'aliases'")
        sources = raw.get("sources") or {}
        if not isinstance(sources, dict):
            raise InstructionError(f"{p}: 'sources' must be a mapping of source name -> instructions")
        aliases = raw.get("aliases") or {}
        if not isinstance(aliases, dict):
            raise InstructionError(f"{p}: 'aliases' must be a mapping of other name -> source name")
        for a, target in aliases.items():
            if str(target) not in sources:
                raise InstructionError(f"{p}:aliases.{a} points to {target!r}, which is not a source")
            if str(a) in sources:
                raise InstructionError(f"{p}:aliases.{a} is also a source name")
        return cls(
            _entry(f"{p}:default", raw["default"]),
            {str(k): _entry(f"{p}:sources.{k}", v) for k, v in sources.items()},
            {str(a): str(t) for a, t in aliases.items()},
        )

    def known(self, source: str) -> bool:
        return source in self.sources or source in self.aliases

    def lookup(self, source: str | None, allow_unknown: bool) -> Instructions | None:
        """None means: the source is unknown and unknown sources are not allowed."""
        if source is None:
            return self.default
        if source in self.sources:
            return self.sources[source]
        if source in self.aliases:
            return self.sources[self.aliases[source]]
        return self.default if allow_unknown else None
