"""Compress + generate from an exported tiny model (arctrain.inference.generate and `arctrain generate`); about 20 s."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from arctrain.cli import main as arctrain
from arctrain.inference.generate import ARCGenerator, left_pad
from arctrain.testing.corpus import read_corpus


@pytest.fixture(scope="module")
def arc(exported, tiny_models) -> ARCGenerator:
    return ARCGenerator(exported, tiny_models / "llama")


@pytest.fixture(scope="module")
def documents(tiny_models) -> list[str]:
    docs = [r["text"] for r in read_corpus(tiny_models / "corpus.jsonl")]
    return [d for d in docs if len(d) > 1500][:3]


def test_long_context_is_cut_into_segments_at_word_boundaries(arc, documents, tiny_shards):
    text = documents[0][:1500]
    segments = arc.segments(text)
    assert arc.config.segment_tokens == json.loads((tiny_shards / "manifest.json").read_text())["segment_tokens"]
    assert len(segments) > 2  # 1500 characters are several segments of the test shards' length (16-64 tokens)
    assert all(0 < len(s) <= arc.config.segment_tokens for s in segments)
    decoded = [arc.enc_tok.decode(s) for s in segments]
    assert "".join(decoded) == text  # nothing lost, nothing repeated
    # Cuts are at word breaks, except inside a word too long to fit (then the segment is full: arc-data's rule).
    inside_words = [
        i for i, (d, d2) in enumerate(zip(decoded, decoded[1:])) if not (d[-1].isspace() or d2[0].isspace())
    ]
    assert len(inside_words) < len(segments) / 4
    assert all(len(segments[i]) == arc.config.segment_tokens for i in inside_words)
    memory = arc.memory([text, documents[1][:200]])
    assert memory.segments == segments + arc.segments(documents[1][:200]) and memory.special == "cont"


def test_greedy_generation_is_text_and_deterministic(arc, documents):
    contexts, prompts = [documents[0][:1200], documents[1][:300]], ["\nIn short, the", "\nThe"]
    first = arc.complete(contexts, prompts, max_new_tokens=12)
    second = arc.complete(contexts, prompts, max_new_tokens=12)
    assert first.texts == second.texts
    assert all(t.strip() for t in first.texts), first.texts
    # Left padding: each prompt generates the same alone as in the batch.
    for context, prompt, text in zip(contexts, prompts, first.texts, strict=True):
        assert arc.complete([context], [prompt], max_new_tokens=12).texts == [text]
    assert first.encoder_tokens > 0 and 0 < first.memory_vectors < first.encoder_tokens


def test_sampling_follows_the_seed(arc, documents):
    options = dict(max_new_tokens=12, sample=True, temperature=1.5, top_p=0.95)
    a = arc.complete([documents[0][:500]], [" The"], seed=1, **options).texts
    assert arc.complete([documents[0][:500]], [" The"], seed=1, **options).texts == a
    others = {arc.complete([documents[0][:500]], [" The"], seed=s, **options).texts[0] for s in (2, 3, 4)}
    assert others != {a[0]}


def test_left_pad_moves_each_row_to_the_end():
    embeds = torch.arange(12.0).view(2, 3, 2)  # (B, T, D)
    out, out_mask = left_pad([embeds[0, :2], embeds[1]])  # packed rows of 2 and 3 positions
    assert out_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert out[0].tolist() == [[0.0, 0.0], [0.0, 1.0], [2.0, 3.0]] and torch.equal(out[1], embeds[1])


def test_generate_command_prints_what_the_api_generates(arc, exported, tiny_models, documents, tmp_path, capsys):
    context = tmp_path / "doc.txt"
    context.write_text(documents[0][:800])
    argv = ["generate", "--model", str(exported), "--decoder", str(tiny_models / "llama"), "--context-file"]
    arctrain([*argv, str(context), "--prompt", "\nThe", "--max-new-tokens", "10", "--dtype", "fp32", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert printed == arc.complete([documents[0][:800]], ["\nThe"], max_new_tokens=10).texts[0] + "\n"


def test_generate_bad_input_is_one_line(exported, tiny_models, tmp_path, capsys):
    context = tmp_path / "doc.txt"
    context.write_text("Some text.")
    cases = [
        (["--decoder", str(tiny_models / "llama"), "--context-file", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--decoder", str(tiny_models / "encoder"), "--context-file", str(context)], "--decoder-name"),
        (
            ["--decoder", str(tiny_models / "llama"), "--decoder-name", "mistral", "--context-file", str(context)],
            "not the one decoder 'mistral' was trained with",
        ),
        (
            ["--decoder", str(tiny_models / "llama"), "--decoder-name", "gpt", "--context-file", str(context)],
            "this model has decoders llama, mistral",
        ),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            arctrain(["generate", "--model", str(exported), *args, "--prompt", "x"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_generate_command_batches_many_contexts_as_one_at_a_time(exported, tiny_models, documents, tmp_path, capsys):
    """fp32 greedy: a batch of 3 left-padded contexts generates what each generates alone."""
    files = []
    for i, text in enumerate([documents[0][:900], documents[1][:200], documents[2][:500]]):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text)
    argv = [
        "generate",
        "--model",
        str(exported),
        "--decoder",
        str(tiny_models / "llama"),
        "--prompt",
        "\nThe",
        "--max-new-tokens",
        "10",
        "--dtype",
        "fp32",
        "--context-file",
        *map(str, files),
    ]
    arctrain([*argv, "--batch-size", "3"])
    batched = capsys.readouterr().out
    arctrain([*argv, "--batch-size", "1"])
    assert capsys.readouterr().out == batched
    assert batched.count("==> ") == 3 and f"==> {files[2]} <==" in batched


def test_bf16_is_the_default_dtype_on_cpu_too(exported, tiny_models):
    from arctrain.inference.generate import parse_args, runtime

    args = parse_args(["--model", "m", "--decoder", "d", "--context-file", "c", "--prompt", "p"])
    assert runtime(args) == (torch.device("cpu"), torch.bfloat16)
    arc = ARCGenerator(exported, tiny_models / "llama", dtype=torch.bfloat16)
    assert {p.dtype for p in arc.model.parameters()} == {torch.bfloat16}
    assert arc.complete(["Some text about files."], ["\nThe"], max_new_tokens=4).texts[0].strip()


def test_generation_stops_at_the_decoders_and_the_given_stop_ids(arc, exported, tiny_models, documents):
    first = arc.decoder.generate(
        inputs_embeds=arc.embed([arc.context_example(documents[0][:300], "\nThe")])[0],
        max_new_tokens=1,
        do_sample=False,
        pad_token_id=arc.stop_ids[0],
    )[0, 0].item()
    stopping = ARCGenerator(exported, tiny_models / "llama", stop_token_ids=[first])
    assert stopping.stop_ids == [*arc.stop_ids, first] and arc.stop_ids  # the decoder's own EOS first
    full = arc.complete([documents[0][:300]], ["\nThe"], max_new_tokens=8).texts[0]
    stopped = stopping.complete([documents[0][:300]], ["\nThe"], max_new_tokens=8).texts[0]
    assert stopped == arc.dec_tok.decode([first], skip_special_tokens=True) and len(full) > len(stopped)


def test_stop_ids_include_the_generation_configs_list():
    from types import SimpleNamespace

    from arctrain.inference.generate import stop_ids

    decoder = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 9, 2]))
    assert stop_ids(decoder, SimpleNamespace(eos_token_id=2)) == [2, 7, 9]  # as Llama 3.1: <|end_of_text|>, <|eot_id|>


# --- long contexts (the paper's context-extension setting): chunks of chunk_tokens, at most max_chunks -------------


@pytest.fixture(scope="module")
def long_document(tiny_models, arc) -> str:
    """Corpus documents joined until the text passes 4.5x the tiny decoders' window (4096) in encoder tokens."""
    window = arc.decoder.config.max_position_embeddings
    parts, tokens = [], 0
    for record in read_corpus(tiny_models / "corpus.jsonl"):
        parts.append(record["text"])
        tokens += len(arc.enc_tok.encode(record["text"], add_special_tokens=False))
        if tokens > 4.5 * window:
            return "\n\n".join(parts)
    raise AssertionError("the corpus is shorter than the test needs")


def test_a_context_several_windows_long_is_compressed_chunk_by_chunk(exported, tiny_models, long_document):
    """Chunks of 1024 encoder tokens, the first 6 kept: the decoder reads their vectors one after the other (each
    chunk compressed on its own, positions from 0: the same vectors as compressing it alone), the prompt fits the
    window although the document is over 4.5 windows long (30k tokens), and what was left out is counted."""
    arc = ARCGenerator(exported, tiny_models / "llama", chunk_tokens=1024, max_chunks=6)
    window = arc.decoder.config.max_position_embeddings
    chunks = arc.segments(long_document)
    assert sum(map(len, chunks)) > 4 * window and len(chunks) > 16 and all(0 < len(c) <= 1024 for c in chunks)
    assert "".join(arc.enc_tok.decode(c) for c in chunks) == long_document  # the chunks cover the text, in order
    example = arc.context_example(long_document, "\nIn short,")
    assert example.pieces[0].segments == chunks[:6]
    assert vars(arc.pieces.cut) == {
        "contexts": 1,
        "truncated": 1,
        "dropped_chunks": len(chunks) - 6,
        "dropped_tokens": sum(map(len, chunks[6:])),
    }
    batch = arc.batch([example]).to(arc.device)
    vectors = arc.model.embed(batch, arc.name)[0, batch.dec_slot[0] >= 0]  # (6 chunks' vectors + <Cont>, Dd)
    alone = []
    for chunk in chunks[:6]:  # an independent computation: each chunk through the encoder by itself
        ids = torch.tensor([chunk])
        (pooled,) = arc.model.compress(ids, torch.ones_like(ids))
        alone.append(arc.model.projectors[arc.name](pooled))
    alone = torch.cat(alone)  # (sum m_j, Dd)
    assert alone.shape[0] == sum(-(-len(c) // arc.config.pooling_factor) for c in chunks[:6]) == len(vectors) - 1
    torch.testing.assert_close(vectors[:-1], alone, atol=1e-5, rtol=1e-4)
    out = arc.generate([example], max_new_tokens=4)
    assert out.encoder_tokens == sum(map(len, chunks[:6])) and out.stats.dropped_tokens == sum(map(len, chunks[6:]))
    assert out.prompt_tokens[0] + 4 <= window and out.texts[0].strip()


def test_a_prompt_past_the_decoders_window_is_refused_in_one_line(
    exported, tiny_models, long_document, tmp_path, capsys
):
    arc = ARCGenerator(exported, tiny_models / "llama", chunk_tokens=1024)  # every chunk: 30k tokens / x4 > 4096
    with pytest.raises(ValueError, match=r"more than the window of decoder 'llama' \(max_position_embeddings=4096\)"):
        arc.complete([long_document], ["\nIn short,"], max_new_tokens=4)
    doc = tmp_path / "long.txt"
    doc.write_text(long_document)
    args = [
        "generate",
        "--model",
        str(exported),
        "--decoder",
        str(tiny_models / "llama"),
        "--context-file",
        str(doc),
        "--prompt",
        "\nIn short,",
        "--max-new-tokens",
        "4",
        "--dtype",
        "fp32",
        "--chunk-tokens",
        "1024",
    ]
    arctrain([*args, "--max-chunks", "6"])
    out, err = capsys.readouterr()
    assert out.strip() and "--max-chunks 6: 1 of 1 contexts cut short" in err


def test_eval_cuts_contexts_as_asked_and_reports_what_it_left_out(exported, tiny_models, tiny_qa, tmp_path, capsys):
    """`arctrain eval --chunk-tokens 16 --max-chunks 1`: each compressed context is its first 16-token chunk (at most
    16 encoder tokens per question), and the JSON and the table say how many contexts were cut and by how much."""
    out = tmp_path / "eval.json"
    arctrain(
        [
            "eval",
            "--model",
            str(exported),
            "--decoder",
            str(tiny_models / "llama"),
            "--data",
            str(tiny_qa[1]),
            "--shots",
            "0",
            "--max-new-tokens",
            "2",
            "--dtype",
            "fp32",
            "--context",
            "segments",
            "--chunk-tokens",
            "16",
            "--max-chunks",
            "1",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    (dataset,) = result["datasets"].values()
    cut, n = result["context_cut"], dataset["n"]
    assert (cut["chunk_tokens"], cut["max_chunks"], cut["contexts"], cut["truncated"]) == (16, 1, n, n)
    assert 0 < dataset["modes"]["compressed"]["prefill"]["encoder_tokens"] <= 16  # per question
    assert cut["dropped_tokens"] > 0 and f"{n} of {n} contexts cut short" in capsys.readouterr().out


# --- a decoder with a chat template (arctrain/data/prompt.py) -------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def linked_decoder(source: Path, out: Path, **configs: dict) -> Path:
    """A decoder directory of `source`'s files (linked) with some JSON configs changed: `name={key: value}`."""
    out.mkdir()
    for file in source.iterdir():
        if file.stem not in configs:
            (out / file.name).symlink_to(file)
    for stem, changes in configs.items():
        path = source / f"{stem}.json"
        (out / path.name).write_text(
            json.dumps({**(json.loads(path.read_text()) if path.is_file() else {}), **changes})
        )
    return out


@pytest.fixture(scope="module")
def chat_llama(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama with a Mistral-Instruct-style chat template: tokenizer_config.json is not among the files of
    the tokenizer's hash, so the export still knows it as its decoder "llama"."""
    out = tmp_path_factory.mktemp("chat") / "llama"
    return linked_decoder(tiny_models / "llama", out, tokenizer_config={"chat_template": CHAT_TEMPLATE})


def greedy_ids(decoder, embeds: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens after `embeds` (T, Dd), one full forward each: no generate, no cache, no stop."""
    ids, x = [], embeds[None]
    for _ in range(n):
        ids.append(int(decoder(inputs_embeds=x).logits[0, -1].argmax()))
        x = torch.cat([x, decoder.get_input_embeddings()(torch.tensor([[ids[-1]]]))], 1)
    return ids


@torch.no_grad()
def test_generate_renders_the_chat_template_with_the_vectors_at_the_placeholder(
    arc, exported, chat_llama, documents, tmp_path, capsys
):
    """`arctrain generate` with a decoder whose tokenizer has a chat template: the decoder reads the template's own
    rendering of one user message (the context, then the prompt) with the context's vectors at the placeholder: the
    input embeddings equal an independent assembly (apply_chat_template split at the placeholder; token embeddings
    around each chunk's encoder vectors and <Cont>, projected). The command prints greedy decoding of those
    embeddings, up to the decoder's EOS (its generation config's, as Llama 3.1 Instruct's <|eot_id|>), which it does
    not print past. --plain-prompt gives the plain layout: what the same decoder without a template generates."""
    from arctrain.data.prompt import PLACEHOLDER

    text, prompt = documents[0][:300], "Question: what does it return?"
    chat = ARCGenerator(exported, chat_llama)
    assert chat.chat is not None and arc.chat is None  # the same tokenizer; only the template differs
    embeds, mask, _ = chat.embed([chat.context_example(text, prompt)])  # (1, T, Dd): one row, no padding

    tok, model = chat.dec_tok, chat.model
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": f"{PLACEHOLDER}\n{prompt}"}], tokenize=False, add_generation_prompt=True
    )
    before, after = rendered.removeprefix(tok.bos_token).split(PLACEHOLDER)
    assert (before, after) == ("[INST] ", f"\n{prompt} [/INST]")
    table, projector = chat.decoder.get_input_embeddings(), model.projectors["llama"]
    chunks = arc.segments(text)
    assert len(chunks) > 1  # several chunks of the training segment length, one after the other
    vectors = [projector(model.compress(torch.tensor([c]), torch.ones(1, len(c), dtype=torch.long))[0]) for c in chunks]
    cont = projector(model.specials["llama"]()[1:])  # (1, Dd): <Cont> (the specials are <Rec>, <Cont>)
    expected = torch.cat(
        [
            table(torch.tensor([tok.bos_token_id, *tok.encode(before, add_special_tokens=False)])),
            *vectors,
            cont,
            table(torch.tensor(tok.encode(after, add_special_tokens=False))),
        ]
    )
    assert mask.tolist() == [[1] * len(expected)]
    torch.testing.assert_close(embeds[0], expected, atol=1e-5, rtol=1e-4)

    # The decoder's EOS: a greedy token from the third on that did not come before (it stops there, not earlier).
    ids = greedy_ids(chat.decoder, expected, 8)
    k = next(i for i in range(2, 8) if ids[i] not in ids[:i])
    assert not set(ids[: k + 1]) & set(chat.stop_ids)
    eos = [*chat.stop_ids, ids[k]]
    stopping = linked_decoder(chat_llama, tmp_path / "eos", generation_config={"eos_token_id": eos})
    (tmp_path / "doc.txt").write_text(text)
    argv = [
        "generate",
        "--model",
        str(exported),
        "--context-file",
        str(tmp_path / "doc.txt"),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "8",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--decoder",
    ]
    arctrain([*argv, str(stopping)])
    assert capsys.readouterr().out == tok.decode(ids[: k + 1], skip_special_tokens=True) + "\n"
    arctrain([*argv, str(chat_llama), "--plain-prompt"])
    assert capsys.readouterr().out == arc.complete([text], [prompt], max_new_tokens=8).texts[0] + "\n"

    # An export fine-tuned with data.qa_chat_template=false (its qa_context says so) renders plain by default.
    plain = tmp_path / "plain-export"
    shutil.copytree(exported, plain)
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "qa_context": {"chat_template": False}}))
    assert ARCGenerator(plain, chat_llama).chat is None and ARCGenerator(plain, chat_llama, chat_template=True).chat
