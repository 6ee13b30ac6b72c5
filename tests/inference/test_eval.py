"""QA evaluation: the paper's metrics on hand-computed cases, fixed shots, prompt layout, `arctrain eval` end to end
with two datasets; about 15 s."""

import json

import pytest

from arctrain.cli import main as arctrain
from arctrain.data.prompt import qa_prompt, qa_turn
from arctrain.data.qa_records import read_qa
from arctrain.inference.eval import MODES, answer_text, exact_match, f1_score, normalize_answer, shots_and_questions
from arctrain.inference.qa_metrics import answer_in, approx_match, bleu, rouge_l
from arctrain.model import Memory, Text
from arctrain.testing.corpus import read_corpus


def test_squad_normalisation_and_metrics():
    assert normalize_answer("  The Cat,  sat on A mat!") == "cat sat on mat"
    assert exact_match("the Eiffel Tower.", ["Paris", "Eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel tower"]) == 0.0
    assert f1_score("Paris France", ["Paris"]) == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert f1_score("an apple a day", ["apple pie"]) == pytest.approx(0.5)  # "apple day" vs "apple pie"
    assert f1_score("apple pie", ["pear", "apple pie"]) == 1.0  # best over the answers
    assert f1_score("the", ["a"]) == 1.0  # both normalise to nothing
    assert f1_score("", ["Paris"]) == 0.0
    assert f1_score("new york new york", ["new york"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets
    assert answer_text("\n Paris, France\nQuestion: next\n\nDocument: x") == "Paris, France\nQuestion: next"
    assert answer_text("\n\nParis") == ""  # the reference's cut: what comes before the first blank line


def test_the_references_other_metrics():
    assert approx_match("It was the Eiffel Tower, in Paris.", ["eiffel tower"]) == 1.0  # a contiguous run of words
    assert approx_match("Eiffel and then Tower", ["Eiffel Tower"]) == 0.0
    assert answer_in("Born in 1843, she", ["1843"]) == 1.0 and answer_in("18430", ["1843"]) == 0.0
    assert answer_in("CAFÉ au lait", ["café"]) == 1.0 and answer_in("Cafe au lait", ["café"]) == 0.0  # NFD, uncased
    # ROUGE-L: LCS "the cat on mat" (4 of 6 and of 5 words) -> F = 2 * 4/6 * 4/5 / (4/6 + 4/5)
    assert rouge_l("the cat sat on the mat", ["the cat lay on mat"]) == pytest.approx(
        2 * 4 / 6 * 4 / 5 / (4 / 6 + 4 / 5)
    )
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert bleu(["a b c d"], [["w x y z"]]) == pytest.approx(0.0)


def test_shots_are_the_first_records_and_are_not_asked():
    records = [
        {"question": f"q{i}", "answers": [f"a{i}", "other"], "passages": ["p", "p2"], "instruction": None}
        for i in range(4)
    ]
    turns, asked = shots_and_questions(records, 2, max_passages=1)
    assert [t.answer for t in turns] == ["a0", "a1"] and [r["question"] for r in asked] == ["q2", "q3"]
    assert turns[0].parts[1].passages == ["p"]
    with pytest.raises(ValueError, match="4 records: --shots 4 leaves none to ask"):
        shots_and_questions(records, 4, 1)


def _write_qa(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_file_without_usable_records_is_one_line(tmp_path, exported, tiny_models, capsys):
    qa = tmp_path / "qa.jsonl"
    _write_qa(qa, [{"question": "q", "passages": "p"}])
    with pytest.raises(SystemExit) as exit_info:
        arctrain(["eval", "--model", str(exported), "--decoder", str(tiny_models / "llama"), "--data", str(qa)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[0].startswith(f"warning: skipped {qa}:1: invalid_answer")
    assert err[-1] == f"arctrain: error: {qa}: no usable QA records (invalid_answer=1)"


@pytest.fixture(scope="module")
def qa_records(tiny_models) -> list[dict]:
    """Questions about real corpus documents (the tiny decoders were pretrained on this corpus)."""
    docs = [r for r in read_corpus(tiny_models / "corpus.jsonl") if len(r["text"]) > 400][:4]
    return [
        {
            "question": f"Which module is this about: {d['id'].split('/')[-1]}?",
            "answers": [d["id"].split("/")[-1]],
            "passages": [d["text"][:300], d["text"][300:400]] if i % 2 else d["text"][:300],
        }
        for i, d in enumerate(docs)
    ]


def test_prompt_layout_per_mode(exported, tiny_models, qa_records, tmp_path):
    from arctrain.inference.generate import ARCGenerator

    arc = ARCGenerator(exported, tiny_models / "llama", context="joint")
    _write_qa(tmp_path / "qa.jsonl", qa_records)
    records = read_qa(tmp_path / "qa.jsonl")  # passages: always a list
    r0, r1, r2 = records[0], records[1], records[2]
    shots, _ = shots_and_questions(records, 2, max_passages=2)
    asked = qa_turn(r2, r2["passages"])
    open_book = qa_prompt(arc, arc.chat, shots, asked, "open_book")
    text = arc.dec_tok.decode([i for p in open_book.pieces for i in p.ids])
    assert arc.chat is None and text == (
        f"Document: {r0['passages'][0]}\nQuestion: {r0['question']}\nAnswer: {r0['answers'][0]}\n\n"
        f"Document: {r1['passages'][0]}\n{r1['passages'][1]}\n"
        f"Question: {r1['question']}\nAnswer: {r1['answers'][0]}\n\n"
        f"Document: {r2['passages'][0]}\nQuestion: {r2['question']}\nAnswer:"
    )
    closed = qa_prompt(arc, arc.chat, shots, asked, "closed_book")
    assert arc.dec_tok.decode([i for p in closed.pieces for i in p.ids]).startswith(f"Question: {r0['question']}\n")
    compressed = qa_prompt(arc, arc.chat, shots, asked, "compressed").pieces
    assert [type(p) for p in compressed] == [Text, Memory] * 3 + [Text]
    assert compressed[3].segments == arc.memory(r1["passages"]).segments and len(compressed[3].segments) == 1
    assert arc.dec_tok.decode(compressed[6].ids) == f"\nQuestion: {r2['question']}\nAnswer:"


def test_eval_command_end_to_end(exported, tiny_models, qa_records, tmp_path, capsys):
    import zstandard

    qa, other, heldout, out = (tmp_path / n for n in ("qa.jsonl", "sums.jsonl.zst", "heldout.jsonl", "results.json"))
    _write_qa(qa, qa_records)
    texts = [r["passages"][0] for r in read_qa(qa)]
    summaries = [{"answer": t[:40], "passage": t, "metric": "rougeL"} for t in texts[:3]]
    other.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in summaries).encode()))
    _write_qa(heldout, [{"text": t} for t in texts])
    argv = ["eval", "--model", str(exported), "--decoder", str(tiny_models / "mistral"), "--data", str(qa), str(other)]
    arctrain([*argv, "--shots", "1", "--max-new-tokens", "6", "--heldout", str(heldout), "--out", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["decoder"] == "mistral" and result["shots"] == 1 and set(result["datasets"]) == {"qa", "sums"}
    ds, asked = result["datasets"]["qa"], read_qa(qa)[1:]
    assert ds["n"] == 3 and set(ds["modes"]) == set(MODES) and len(ds["records"]) == 3
    for mode in MODES:
        predictions = [r["predictions"][mode] for r in ds["records"]]
        assert all("\n\n" not in p for p in predictions)
        em = [exact_match(p, r["answers"]) for p, r in zip(predictions, asked, strict=True)]
        f1 = [f1_score(p, r["answers"]) for p, r in zip(predictions, asked, strict=True)]
        assert ds["modes"][mode]["exact_match"] == pytest.approx(100 * sum(em) / 3)
        assert ds["modes"][mode]["f1"] == pytest.approx(100 * sum(f1) / 3)
        assert f"  {mode:<12} {ds['modes'][mode]['exact_match']:6.1f}" in printed
        sums = result["datasets"]["sums"]["modes"][mode]
        assert set(sums) == {"rougeL", "prefill"}  # only the metric its records ask for
        preds = [r["predictions"][mode] for r in result["datasets"]["sums"]["records"]]
        expected = sum(rouge_l(p, [s["answer"]]) for p, s in zip(preds, summaries[1:], strict=True)) / 2
        assert sums["rougeL"] == pytest.approx(100 * expected)
    in_context = [answer_in(r["passages"][0], r["answers"]) for r in asked]
    assert ds["context_has_answer"] == pytest.approx(100 * sum(in_context) / 3)
    prefill = {mode: ds["modes"][mode]["prefill"] for mode in MODES}
    # Compressed passages take fewer decoder positions than their text, and only they use the encoder.
    assert prefill["closed_book"]["decoder_tokens"] < prefill["compressed"]["decoder_tokens"]
    assert prefill["compressed"]["decoder_tokens"] < prefill["open_book"]["decoder_tokens"]
    assert prefill["compressed"]["encoder_tokens"] > 0 == prefill["open_book"]["encoder_tokens"]
    assert all(p["flops"] > 0 and p["seconds_to_first_token"] > 0 for p in prefill.values())
    recon = result["reconstruction"]
    assert recon["segments"] >= 4 and recon["tokens"] > 0 and 0 <= recon["token_accuracy"] <= 1 and recon["loss"] > 0
