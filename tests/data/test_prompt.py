"""Prompt rendering (arctrain/data/prompt.py): the plain layout per mode, and chat templates with the compressed
documents spliced at their placeholders; about 3 s (tokenizers only)."""

import pytest
from transformers import AutoTokenizer

from arctrain.data.batch import Memory, Text
from arctrain.data.prompt import PLACEHOLDER, Doc, Turn, chat_template_of, qa_prompt, qa_turn, render
from arctrain.data.qa import TextPieces


class Strings:
    """Pieces as strings: text stays text, a document becomes Memory of its passages (a layout without tokenizers)."""

    def text(self, text, first=False):
        return Text([text])

    def memory(self, passages, special="cont"):
        return Memory([passages], special)

    def doc_memory(self, doc):
        return self.memory(doc.passages)


def layout(pieces) -> str:
    return "".join(p.ids[0] if isinstance(p, Text) else "<" + "|".join(p.segments[0]) + ">" for p in pieces)


RECORDS = [
    {"question": "Who wrote it?", "passages": ["Ada wrote it.", "In 1843."], "instruction": None},
    {"question": "Where?", "passages": ["In London."], "instruction": "Answer briefly."},
]


def test_plain_layout_in_every_mode():
    shot, asked = qa_turn(RECORDS[0], RECORDS[0]["passages"], "Ada"), qa_turn(RECORDS[1], RECORDS[1]["passages"])
    assert layout(render(Strings(), None, [shot, asked], "compressed")) == (
        "Document: <Ada wrote it.|In 1843.>\nQuestion: Who wrote it?\nAnswer: Ada\n\n"
        "Answer briefly.\n\nDocument: <In London.>\nQuestion: Where?\nAnswer:"
    )
    assert layout(render(Strings(), None, [shot, asked], "open_book")) == (
        "Document: Ada wrote it.\nIn 1843.\nQuestion: Who wrote it?\nAnswer: Ada\n\n"
        "Answer briefly.\n\nDocument: In London.\nQuestion: Where?\nAnswer:"
    )
    assert layout(render(Strings(), None, [shot, asked], "closed_book")) == (
        "Question: Who wrote it?\nAnswer: Ada\n\nAnswer briefly.\n\nQuestion: Where?\nAnswer:"
    )
    no_question = qa_turn({"question": "", "passages": ["T."], "instruction": "Summarise."}, ["T."])
    assert layout(render(Strings(), None, [no_question], "compressed")) == "Summarise.\n\nDocument: <T.>\nAnswer:"
    with pytest.raises(ValueError, match="unknown mode 'book'"):
        render(Strings(), None, [asked], "book")


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def chat_llama(tiny_models):
    """The tiny Llama's tokenizer with a Mistral-Instruct-style chat template."""
    tok = AutoTokenizer.from_pretrained(tiny_models / "llama")
    tok.chat_template = TEMPLATE
    return tok


def test_a_chat_template_renders_the_prompt_with_the_vectors_at_the_placeholders(tiny_models, chat_llama):
    enc = AutoTokenizer.from_pretrained(tiny_models / "encoder")
    pieces = TextPieces(enc, chat_llama, 16, context="joint", context_tokens=512)
    shot, asked = qa_turn(RECORDS[0], RECORDS[0]["passages"], "Ada"), qa_turn(RECORDS[1], RECORDS[1]["passages"])
    example = qa_prompt(pieces, chat_llama, [shot], asked, "compressed", "London", chat_llama.eos_token_id)
    kinds = [type(p) for p in example.pieces]
    assert kinds == [Text, Memory, Text, Memory, Text, Text] and example.pieces[-1].loss
    assert example.pieces[1].segments == pieces.memory(RECORDS[0]["passages"]).segments  # jointly, one sequence
    # The text around the vectors is the template's own rendering, cut at the placeholders (BOS left to collate).
    messages = [
        {"role": "user", "content": f"Document: {PLACEHOLDER}\nQuestion: Who wrote it?"},
        {"role": "assistant", "content": "Ada"},
        {"role": "user", "content": f"Answer briefly.\n\nDocument: {PLACEHOLDER}\nQuestion: Where?"},
    ]
    rendered = chat_llama.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, middle, after = rendered.removeprefix(chat_llama.bos_token).split(PLACEHOLDER)
    texts = [p.ids for p in example.pieces if isinstance(p, Text)]
    assert texts[0] == chat_llama.encode(before, add_special_tokens=False)
    assert chat_llama.decode(texts[1]) == middle and chat_llama.decode(texts[2]) == after
    assert texts[3][-1] == chat_llama.eos_token_id and chat_llama.decode(texts[3][:-1]) == "London"
    assert chat_template_of(chat_llama) is chat_llama and chat_template_of(chat_llama, enabled=False) is None
    assert chat_template_of(AutoTokenizer.from_pretrained(tiny_models / "mistral")) is None  # base: plain


def test_open_book_chat_is_the_template_with_the_text(tiny_models, chat_llama):
    enc = AutoTokenizer.from_pretrained(tiny_models / "encoder")
    pieces = TextPieces(enc, chat_llama, 16)
    turn = Turn(["Document: ", Doc(["One.", "Two."]), "\nQuestion: q"])
    (only,) = render(pieces, chat_llama, [turn], "open_book")
    expected = chat_llama.apply_chat_template(
        [{"role": "user", "content": "Document: One.\nTwo.\nQuestion: q"}], tokenize=False, add_generation_prompt=True
    )
    assert chat_llama.bos_token + chat_llama.decode(only.ids) == expected


def test_smollm2_training_rows_are_its_chat_template(smollm2, tiny_models):
    """SmolLM2-Instruct's own template (system prompt, <|im_start|> turns): a QA training row reads as the chat
    the template renders, the vectors in the user message, the target the answer then <|im_end|> (its EOS)."""
    from arctrain.data.batch import collate

    tok, enc = AutoTokenizer.from_pretrained(smollm2), AutoTokenizer.from_pretrained(smollm2)
    pieces = TextPieces(enc, tok, 16, context="joint", context_tokens=512)
    chat = chat_template_of(tok)
    example = qa_prompt(pieces, chat, [], qa_turn(RECORDS[0], ["Ada wrote it."]), "compressed", "Ada", tok.eos_token_id)
    batch = collate(
        [example],
        pooling="mean_pooled_queries",
        factor=4,
        n_vectors=0,
        enc_pad_id=0,
        dec_pad_id=tok.pad_token_id,
        bos_id=tok.bos_token_id,
    )
    ids, slots, labels = batch.dec_ids[0].tolist(), batch.dec_slot[0].tolist(), batch.labels[0].tolist()  # one row
    hash_id = tok.convert_tokens_to_ids("#")  # '#' stands for each vector position in the decoded row
    text = tok.decode([hash_id if s >= 0 else i for i, s in zip(ids, slots, strict=True)])
    vectors = sum(s >= 0 for s in slots)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": f"Document: {'#' * vectors}\nQuestion: Who wrote it?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == expected + "Ada" + tok.eos_token and tok.eos_token == "<|im_end|>"
    assert tok.decode([t for t in labels if t != -100]) == "Ada<|im_end|>"
