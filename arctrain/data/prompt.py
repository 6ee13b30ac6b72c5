"""Prompts with compressed documents: one rendering for QA training, `arctrain eval` and `arctrain generate`.

A prompt is a list of turns, each the user's text with documents in it (`Doc`) and, for few-shot turns, the answer.
A base decoder gets the plain layout (arctrain's, and the reference's `create_prompt`):

    Document: <doc>\\nQuestion: q\\nAnswer: a\\n\\n ... Document: <doc>\\nQuestion: q\\nAnswer:

A decoder whose tokenizer has a chat template (SmolLM2-Instruct, Llama 3.1 Instruct, Mistral Instruct) gets that
template: each turn a user message (the record's instruction first, then `Document: <doc>\\nQuestion: q`) and each
shot's answer an assistant message, rendered by `tokenizer.apply_chat_template(..., add_generation_prompt=True)`
with a placeholder where each document goes; the compressed vectors are spliced at the placeholders' positions.
The target that follows (training) is the answer and the decoder's EOS, which is also where generation stops.
"""

from dataclasses import dataclass

from arctrain.data.batch import Example, Memory, Text

PLACEHOLDER = "\ue000"  # a private-use character: no template or text holds it; split on before tokenizing
MODES = ("compressed", "open_book", "closed_book")


@dataclass
class Doc:
    passages: list[str]
    doc_ids: list[str] | None = None  # the passages' ids in a vector store (`arctrain eval --vectors`), one each
    memory: Memory | None = None  # the compressed vectors already made (`ARCGenerator.stored_memory`)


@dataclass
class Turn:
    parts: list  # str and Doc, in order
    answer: str | None = None  # a shot's answer; None for the turn being asked


def chat_template_of(tokenizer, enabled: bool = True) -> object | None:
    """The tokenizer when it renders chats (has a chat template) and `enabled`, else None: the plain layout."""
    return tokenizer if enabled and getattr(tokenizer, "chat_template", None) else None


def qa_turn(record: dict, passages: list[str], answer: str | None = None) -> Turn:
    """A QA record as a turn: [instruction] Document: <passages> [Question: q]."""
    parts = []
    instruction = record.get("instruction")
    if instruction:
        parts.append(instruction.replace("{question}", record["question"]).strip() + "\n\n")
    doc_ids = record.get("doc_ids")
    parts += ["Document: ", Doc(passages, doc_ids[: len(passages)] if doc_ids else None)]
    if record["question"]:
        parts.append(f"\nQuestion: {record['question']}")
    return Turn(parts, answer)


def render(pieces, chat, turns: list[Turn], mode: str = "compressed", answer_cue: str = "\nAnswer:") -> list:
    """The turns as decoder pieces (`pieces.text`, `pieces.memory`): Text and Memory, in order.

    mode: "compressed" (documents become memory), "open_book" (their text), "closed_book" (no document: the
    "Document: " part and the document are dropped). `chat`: a tokenizer with a chat template, or None (plain
    layout, where `answer_cue` follows each turn and a shot's answer follows as " a\\n\\n")."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    turns = [Turn(_in_mode(t.parts, mode), t.answer) for t in turns]
    flat = _chat(chat, turns) if chat is not None else _plain(turns, answer_cue)
    out = []
    for part in _merge(flat):
        if isinstance(part, Doc):
            out.append(pieces.doc_memory(part))
        elif part:
            out.append(pieces.text(part, not out))  # the prompt's first piece is tokenized as a text start
    return out


def target(pieces, answer: str, eos_id: int | None, chat: object | None) -> Text:
    """The training target: the answer (after "Answer:" in the plain layout: " a"), then the decoder's EOS."""
    ids = pieces.text(answer.strip() if chat is not None else " " + answer.strip()).ids
    return Text(ids + ([eos_id] if eos_id is not None else []), loss=True)


def qa_prompt(
    pieces, chat, shots: list[Turn], turn: Turn, mode: str, train_answer: str | None = None, eos_id: int | None = None
) -> Example:
    """Few-shot turns, the asked turn, and (training) its answer + EOS as the target."""
    out = render(pieces, chat, [*shots, turn], mode)
    if train_answer is not None:
        out.append(target(pieces, train_answer, eos_id, chat))
    return Example(out)


def _in_mode(parts: list, mode: str) -> list:
    """Documents as memory (compressed), as text (open book), or gone with their "Document: " (closed book)."""
    if mode == "compressed":
        return parts
    out, dropped = [], False
    for i, part in enumerate(parts):
        if isinstance(part, Doc):
            if mode == "open_book":
                out.append("\n".join(p.strip() for p in part.passages))
            dropped = mode == "closed_book"
            continue
        if mode == "closed_book" and part == "Document: " and i + 1 < len(parts) and isinstance(parts[i + 1], Doc):
            continue
        out.append(part.lstrip("\n") if dropped else part)
        dropped = False
    return out


def _plain(turns: list[Turn], answer_cue: str) -> list:
    flat = []
    for t in turns:
        flat += t.parts + [answer_cue]
        if t.answer is not None:
            flat.append(f" {t.answer.strip()}\n\n")
    return flat


def _chat(tokenizer, turns: list[Turn]) -> list:
    """The chat template's text with a placeholder per document, split back into text and documents."""
    docs, messages = [], []
    for t in turns:
        content = ""
        for part in t.parts:
            if isinstance(part, Doc):
                docs.append(part)
                content += PLACEHOLDER
            else:
                content += part
        messages.append({"role": "user", "content": content})
        if t.answer is not None:
            messages.append({"role": "assistant", "content": t.answer.strip()})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        text = text[len(bos) :]  # collate starts every row with the BOS id
    pieces = text.split(PLACEHOLDER)
    if len(pieces) != len(docs) + 1:
        raise ValueError("the chat template dropped or repeated a document placeholder")
    flat = [pieces[0]]
    for doc, after in zip(docs, pieces[1:], strict=True):
        flat += [doc, after]
    return flat


def _merge(flat: list) -> list:
    """Adjacent strings joined (one tokenization), documents kept apart."""
    out = []
    for part in flat:
        if isinstance(part, str) and out and isinstance(out[-1], str):
            out[-1] += part
        else:
            out.append(part)
    return out
