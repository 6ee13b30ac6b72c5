"""Config keys that moved (arctrain/config/renamed.py): the QA keys, once flat in `data` (`data.qa`, `data.qa_val`,
...), are the section `data.qa` now. The old names load to the same Config as the new ones, from a YAML file or the
command line, with one line on stderr naming each old key and its new one; unknown keys still fail in one line."""

import pytest

from arctrain.config.load import load_config
from arctrain.config.schema import ConfigError

HEAD = """\
model:
  encoder_path: /m/enc
decoders:
  - name: llama
    path: /m/llama
train:
  precision: fp32
deepspeed: ds_configs/zero3_cpu.json
data:
  chunk_tokens: 32
"""
NEW = """\
  qa:
    train: [/q/a.jsonl:2:3, /q/b.jsonl]
    val: /q/val.jsonl
    shots: 1
    max_passages: 2
    context: segments
    context_tokens: 512
    chat_template: false
"""
OLD = """\
  qa: /q/a.jsonl:2:3,/q/b.jsonl
  qa_val: /q/val.jsonl
  qa_shots: 1
  qa_max_passages: 2
  qa_context: segments
  qa_context_tokens: 512
  qa_chat_template: false
"""
MOVED = [
    ("data.qa", "data.qa.train"),
    ("data.qa_val", "data.qa.val"),
    ("data.qa_shots", "data.qa.shots"),
    ("data.qa_max_passages", "data.qa.max_passages"),
    ("data.qa_context", "data.qa.context"),
    ("data.qa_context_tokens", "data.qa.context_tokens"),
    ("data.qa_chat_template", "data.qa.chat_template"),
]


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def note_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("config:")]


def test_the_nested_keys_load(tmp_path, capsys):
    cfg = load_config(write(tmp_path, HEAD + NEW))
    qa = cfg.data.qa
    assert (qa.train, qa.val, qa.shots, qa.max_passages) == (["/q/a.jsonl:2:3", "/q/b.jsonl"], ["/q/val.jsonl"], 1, 2)
    assert (qa.context, qa.context_tokens, qa.chat_template, cfg.data.tasks) == ("segments", 512, False, ("qa",))
    assert note_lines(capsys) == []


def test_old_flat_yaml_keys_load_as_the_new_ones_with_one_note(tmp_path, capsys):
    new = load_config(write(tmp_path, HEAD + NEW, "new.yaml"))
    capsys.readouterr()
    old = load_config(write(tmp_path, HEAD + OLD, "old.yaml"))
    assert old == new
    (line,) = note_lines(capsys)
    assert all(f"{before} -> {after}" in line for before, after in MOVED)


@pytest.mark.parametrize("qa", ["[/q/a.jsonl:2:3, /q/b.jsonl]", "\n    - /q/a.jsonl:2:3\n    - /q/b.jsonl"])
def test_the_old_training_list_loads_as_data_qa_train(tmp_path, qa, capsys):
    cfg = load_config(write(tmp_path, HEAD + f"  qa: {qa}\n"))
    assert cfg.data.qa.train == ["/q/a.jsonl:2:3", "/q/b.jsonl"] and cfg.data.tasks == ("qa",)
    assert note_lines(capsys) == [
        "config: old key names read as the new ones (data.qa -> data.qa.train); write the new names"
    ]


def test_old_command_line_keys_load_as_the_new_ones_with_one_note(tmp_path, capsys):
    base = write(tmp_path, HEAD)
    values = ["/q/a.jsonl:2:3,/q/b.jsonl", "/q/val.jsonl", "1", "2", "segments", "512", "false"]
    new = load_config(base, [f"{after}={value}" for (_, after), value in zip(MOVED, values, strict=True)])
    capsys.readouterr()
    old = load_config(base, [f"{before}={value}" for (before, _), value in zip(MOVED, values, strict=True)])
    assert old == new == load_config(write(tmp_path, HEAD + NEW, "new.yaml"))
    (line,) = note_lines(capsys)
    assert all(f"{before} -> {after}" in line for before, after in MOVED)


def test_old_overrides_apply_over_a_nested_file(tmp_path, capsys):
    path = write(tmp_path, HEAD + NEW)
    cfg = load_config(path, ["data.qa=/q/c.jsonl", "data.qa_max_passages=4"])
    assert (cfg.data.qa.train, cfg.data.qa.max_passages, cfg.data.qa.val) == (["/q/c.jsonl"], 4, ["/q/val.jsonl"])
    (line,) = note_lines(capsys)
    assert "data.qa -> data.qa.train" in line and "data.qa_max_passages -> data.qa.max_passages" in line
    assert load_config(path, ["data.qa.1=/q/d"]).data.qa.train == ["/q/a.jsonl:2:3", "/q/d"]  # an old list index
    assert note_lines(capsys) == [
        "config: old key names read as the new ones (data.qa.1 -> data.qa.train.1); write the new names"
    ]


def test_the_note_is_printed_by_rank_0_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert load_config(write(tmp_path, HEAD + OLD)).data.qa.shots == 1
    assert note_lines(capsys) == []


def test_unknown_flat_qa_keys_still_fail_in_one_line(tmp_path):
    path = write(tmp_path, HEAD + "  qa_passages: 3\n")
    with pytest.raises(ConfigError, match=rf"^data\.qa_passages: unknown key \(known: .*\) \({path}:11\)$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^data\.qa_foo: unknown key .*\(command line 'data.qa_foo=4'\)$"):
        load_config(write(tmp_path, HEAD + NEW), ["data.qa_foo=4"])
    with pytest.raises(ConfigError, match=r"^data\.qa\.shot: unknown key \(known: chat_template, context, .*\)"):
        load_config(write(tmp_path, HEAD + NEW), ["data.qa.shot=4"])


def test_an_old_key_beside_its_new_one_is_refused(tmp_path):
    path = write(tmp_path, HEAD + NEW + "  qa_shots: 2\n")
    message = rf"^data\.qa_shots: is the old name of data\.qa\.shots, which is set too: keep data\.qa\.shots \({path}:"
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_errors_in_old_keys_name_the_new_key_and_the_old_line(tmp_path):
    path = write(tmp_path, HEAD + OLD.replace("qa_max_passages: 2", "qa_max_passages: 0"))
    with pytest.raises(ConfigError, match=rf"^data\.qa\.max_passages: 0 must be >= 1 \({path}:14\)$"):
        load_config(path)
