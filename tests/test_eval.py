"""QA evaluation: SQuAD metrics on hand-computed cases, prompt layout, `arctrain eval` end to end; about 15 s."""

import json

import pytest
from test_export_fixtures import *  # noqa: F403  (the session fixtures trained_run, exported)

from arctrain.cli import main as arctrain
from arctrain.corpus import read_corpus
from arctrain.data.qa import qa_example, read_qa, shot_indices
from arctrain.eval import MODES, answer_line, exact_match, f1_score, normalize_answer
from arctrain.model import Memory, Text


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
    assert answer_line("\n\n Paris, France\nQuestion: next") == "Paris, France"


def test_shots_exclude_the_record_and_are_deterministic():
    assert shot_indices(0, 4, 2) == [1, 2]
    assert shot_indices(3, 4, 2) == [0, 1]
    assert shot_indices(1, 4, 5) == [2, 3, 0]  # at most the other records
    assert shot_indices(0, 1, 5) == []


def _write_qa(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_bad_qa_records_name_file_and_line(tmp_path, exported, tiny_models, capsys):
    qa = tmp_path / "qa.jsonl"
    _write_qa(qa, [{"question": "q", "answers": ["a"], "passages": "p"}, {"question": "q", "passages": "p"}])
    with pytest.raises(ValueError, match=rf"^{qa}:2: record has no 'answers'$"):
        read_qa(qa)
    qa.write_text('{"question": "q", "answers": ["a"], "passages": 3}\n')
    with pytest.raises(ValueError, match=rf"^{qa}:1: 'passages' must be list or str$"):
        read_qa(qa)
    qa.write_text('{"question": "q", "answers": ["a"], "passages": "p"}\n{not json\n')
    with pytest.raises(ValueError, match=rf"^{qa}:2: invalid JSON"):
        read_qa(qa)
    _write_qa(qa, [{"question": "q", "answers": ["a"], "passages": "p"}, {"question": "q", "passages": "p"}])
    with pytest.raises(SystemExit) as exit_info:
        arctrain(["eval", "--model", str(exported), "--decoder", str(tiny_models / "llama"), "--data", str(qa)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == f"arctrain: error: {qa}:2: record has no 'answers'"


@pytest.fixture(scope="module")
def qa_records(tiny_models) -> list[dict]:
    """Questions about real corpus documents (the tiny decoders were pretrained on this corpus)."""
    docs = [r for r in read_corpus(tiny_models / "corpus.jsonl") if len(r["text"]) > 400][:4]
    return [
        {"question": f"Which module is this about: {d['id'].split('/')[-1]}?", "answers": [d["id"].split("/")[-1]],
         "passages": [d["text"][:300], d["text"][300:400]] if i % 2 else d["text"][:300]}
        for i, d in enumerate(docs)
    ]  # fmt: skip


def test_prompt_layout_per_mode(exported, tiny_models, qa_records, tmp_path):
    from arctrain.infer import ARCGenerator

    arc = ARCGenerator(exported, tiny_models / "llama")
    _write_qa(tmp_path / "qa.jsonl", qa_records)
    records = read_qa(tmp_path / "qa.jsonl")  # passages: always a list
    r0, r1, r2 = records[0], records[1], records[2]
    open_book = qa_example(arc, records, 0, 2, "open_book")
    text = arc.dec_tok.decode(open_book.pieces[0].ids + open_book.pieces[1].ids + open_book.pieces[2].ids)
    assert text == (
        f"Document: {r1['passages'][0]}\n{r1['passages'][1]}\n"
        f"Question: {r1['question']}\nAnswer: {r1['answers'][0]}\n\n"
        f"Document: {r2['passages'][0]}\nQuestion: {r2['question']}\nAnswer: {r2['answers'][0]}\n\n"
        f"Document: {r0['passages'][0]}\nQuestion: {r0['question']}\nAnswer:"
    )
    closed = qa_example(arc, records, 0, 2, "closed_book")
    assert arc.dec_tok.decode([i for p in closed.pieces for i in p.ids]).startswith(f"Question: {r1['question']}\n")
    compressed = qa_example(arc, records, 0, 2, "compressed").pieces
    assert [type(p) for p in compressed] == [Text, Memory, Text] * 3
    assert compressed[1].segments == arc.segments(r1["passages"][0]) + arc.segments(r1["passages"][1])
    assert arc.dec_tok.decode(compressed[8].ids) == f"\nQuestion: {r0['question']}\nAnswer:"


def test_eval_command_end_to_end(exported, tiny_models, qa_records, tmp_path, capsys):
    qa, heldout, out = tmp_path / "qa.jsonl", tmp_path / "heldout.jsonl", tmp_path / "results.json"
    _write_qa(qa, qa_records)
    _write_qa(
        heldout, [{"text": r["passages"] if isinstance(r["passages"], str) else r["passages"][0]} for r in qa_records]
    )
    argv = ["eval", "--model", str(exported), "--decoder", str(tiny_models / "mistral"), "--data", str(qa)]
    arctrain([*argv, "--shots", "2", "--max-new-tokens", "6", "--heldout", str(heldout), "--out", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["decoder"] == "mistral" and result["n"] == 4 and result["shots"] == 2
    assert set(result["modes"]) == set(MODES) and len(result["records"]) == 4
    for mode in MODES:
        predictions = [r["predictions"][mode] for r in result["records"]]
        assert all("\n" not in p for p in predictions)
        em = [exact_match(p, r["answers"]) for p, r in zip(predictions, qa_records, strict=True)]
        f1 = [f1_score(p, r["answers"]) for p, r in zip(predictions, qa_records, strict=True)]
        assert result["modes"][mode]["exact_match"] == pytest.approx(100 * sum(em) / 4)
        assert result["modes"][mode]["f1"] == pytest.approx(100 * sum(f1) / 4)
        assert f"{mode:<12} {result['modes'][mode]['exact_match']:6.1f}" in printed
    prefill = {mode: result["modes"][mode]["prefill"] for mode in MODES}
    # Compressed passages take fewer decoder positions than their text, and only they use the encoder.
    assert prefill["closed_book"]["decoder_tokens"] < prefill["compressed"]["decoder_tokens"]
    assert prefill["compressed"]["decoder_tokens"] < prefill["open_book"]["decoder_tokens"]
    assert prefill["compressed"]["encoder_tokens"] > 0 == prefill["open_book"]["encoder_tokens"]
    assert all(p["flops"] > 0 and p["seconds_to_first_token"] > 0 for p in prefill.values())
    recon = result["reconstruction"]
    assert recon["segments"] >= 4 and recon["tokens"] > 0 and 0 <= recon["token_accuracy"] <= 1 and recon["loss"] > 0
