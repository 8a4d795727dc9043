"""Every export is also a sentence-transformers model: `SentenceTransformer(export).encode(...)` gives the trainer's
embeddings (same tokens, same pooling, L2-normalised), so MTEB, vector databases and MLflow's sentence-transformers
flavour can use it as it is.

    python -m trainer.st_export runs/demo/stage2/export      # adds the files to an export written before 2026-12-07

The files (the layout sentence-transformers 3-6 read; ST 6 maps the `sentence_transformers.models.*` names):
- `modules.json`: Transformer (the export folder itself) -> Pooling -> Normalize;
- `1_Pooling/config.json`: `lasttoken` for decoders, the trained pooling (mean / cls) for encoders;
- `sentence_bert_config.json`: `max_seq_length` = the documents' token limit, and for decoders `tokenizer_args` that
  make the tokenizer append the pooling token the model was trained with (data_pipeline/text.py: the pad token when
  set, as E2Rank, else EOS). Only sentence-transformers reads these args: the folder's own tokenizer files stay as
  trained, so the shards' tokenizer fingerprint still matches and stage 2 can start from a stage-1 export;
- `config_sentence_transformers.json`: prompts `query` (the default retrieval instruction in E2Rank's query format),
  `document` (empty) and one per instruction-table source, for `encode_query(..., prompt_name=<source>)`.

Texts longer than the limits are cut by the tokenizer, which keeps the appended token, as the trainer does; queries
are cut at `max_seq_length` where the trainer cuts at `query_max_len`, so only queries longer than that differ. The
listwise (PRF prompt) mode has no sentence-transformers equivalent: it stays in `trainer.reranker.Reranker`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from data_pipeline.instructions import InstructionTable
from data_pipeline.text import TextEncoder, format_query

ST_POOLING = {"last": "lasttoken", "mean": "mean_tokens", "cls": "cls_token"}


def query_prompts(template: str, table: InstructionTable) -> dict[str, str]:
    """E2Rank's query format as sentence-transformers prompts (a prefix the query is appended to)."""
    if not template.endswith("{query}"):
        raise ValueError(f"query template {template!r} does not end with {{query}}: it cannot be a prompt prefix")
    prompts = {"query": format_query("", table.default.query[0], template), "document": ""}
    for name, ins in sorted(table.sources.items()):
        prompts[name] = format_query("", ins.query[0], template)
    return prompts


def files(text: TextEncoder, pooling: str, hidden_size: int, table: InstructionTable | None = None) -> dict[str, dict]:
    """The sentence-transformers files of an export, as {relative path: JSON object} (pure: tested without I/O)."""
    if pooling not in ST_POOLING:
        raise ValueError(f"pooling {pooling!r} has no sentence-transformers equivalent ({sorted(ST_POOLING)})")
    table = table or InstructionTable.load()
    bert_cfg: dict = {"max_seq_length": text.cfg.doc_max_len, "do_lower_case": False}
    if not text.n_special:  # a decoder: the tokenizer must append the token the model pools at
        bert_cfg["tokenizer_args"] = {"add_eos_token": True,
                                      "eos_token": text.tok.convert_ids_to_tokens(text.eos_id)}
    pool_cfg = {"word_embedding_dimension": hidden_size, "include_prompt": True,
                **{f"pooling_mode_{m}": m == ST_POOLING[pooling] for m in ("cls_token", "mean_tokens", "max_tokens",
                                                                            "mean_sqrt_len_tokens", "lasttoken")}}
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "sentence_bert_config.json": bert_cfg,
        "config_sentence_transformers.json": {"prompts": query_prompts(text.cfg.query_template, table),
                                              "default_prompt_name": None, "similarity_fn_name": "cosine"},
        "1_Pooling/config.json": pool_cfg,
    }


def write(folder: Path, text: TextEncoder, pooling: str) -> list[str]:
    """Write the files into an export folder (each through a temporary name); returns their relative paths."""
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    out = files(text, pooling, hidden)
    (folder / "2_Normalize").mkdir(exist_ok=True)
    for rel, obj in out.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(path)
    return [*out, "2_Normalize/"]


def add_to_export(folder: Path) -> list[str]:
    """An existing export (it holds e2rank.json): its text contract and pooling, as the Reranker reads them."""
    from common.pretrained import load_tokenizer
    from common.typed_config import from_dict
    from data_pipeline.text import TokenizationConfig
    from modeling.export_format import EXPORT_INFO

    info_path = folder / EXPORT_INFO
    if not info_path.is_file():
        raise FileNotFoundError(f"{folder} is not an E2Rank export (no {EXPORT_INFO})")
    info = json.loads(info_path.read_text())
    cfg = from_dict(TokenizationConfig, {**info["text_format"], "tokenizer": str(folder)})
    return write(folder, TextEncoder(load_tokenizer(str(folder)), cfg), info["pooling"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path, nargs="+", help="export folders (they hold e2rank.json)")
    args = ap.parse_args(argv)
    for folder in args.export:
        print(f"{folder}: wrote {', '.join(add_to_export(folder))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
