"""The config tree: shipped files parse, precedence CLI > YAML > defaults, round trip, one-line errors."""

import json
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from arctrain.config.deepspeed import REPO_ROOT, deepspeed_config
from arctrain.config.load import load_config, save_config
from arctrain.config.schema import Config, ConfigError
from arctrain.train.preflight import check_paths

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
DS_FILES = sorted((REPO_ROOT / "ds_configs").glob("*.json"))

BASE = """\
model:
  encoder_path: /m/enc
decoders:
  - name: llama
    path: /m/llama
  - name: mistral
    path: /m/mistral
    weight: 2
data:
  shards: /d/shards
train:
  precision: fp32
deepspeed: ds_configs/zero3_cpu.json
"""


def write(tmp_path: Path, text: str = BASE, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_files_exist():
    assert {p.name for p in CONFIGS} >= {
        "tiny_cpu.yaml",
        "llama_mistral_1node.yaml",
        "llama_mistral_8node.yaml",
        "llama_mistral_finetune.yaml",
    }
    assert {p.name for p in DS_FILES} == {"zero3_bf16.json", "zero3_offload.json", "zero3_cpu.json"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    expected = ["smollm2", "gemma"] if "smollm2" in path.name else ["llama", "mistral"]  # the demo: two real LLMs
    assert [d.name for d in cfg.decoders] == expected
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_paper_configs_carry_the_paper_hyperparameters():
    for name in ("llama_mistral_1node.yaml", "llama_mistral_8node.yaml"):
        cfg = load_config(REPO_ROOT / "configs" / name)
        assert (cfg.train.steps, cfg.data.micro_batch_size, cfg.optim.warmup_steps) == (80000, 16, 1000)
        assert (cfg.optim.encoder_lr, cfg.optim.projector_lr, cfg.optim.betas) == (1e-5, 5e-5, [0.9, 0.95])
        assert (cfg.optim.weight_decay, cfg.optim.clip, cfg.optim.decay, cfg.train.precision) == (
            0.1,
            1.0,
            "cosine",
            "bf16",
        )
        assert cfg.model.pooling_factor == 8 and cfg.data.task_ratio == 0.2  # the paper pretrains at x8
        assert cfg.optim.min_lr_ratio == 0.0 and cfg.data.interleave_tokens == 0  # as the reference's config
    cfg = load_config(REPO_ROOT / "configs" / "llama_mistral_finetune.yaml")  # the paper's fine-tuning stage
    assert (cfg.optim.encoder_lr, cfg.optim.projector_lr, cfg.optim.weight_decay) == (2e-6, 3e-5, 0.05)
    assert 4000 <= cfg.train.steps <= 8000 and cfg.data.qa.train and cfg.data.tasks == ("qa",) and cfg.train.init_from
    assert cfg.model.pooling_factor == 4 and cfg.data.qa.shots == 5  # x4 from the x8 encoder, 5-shot
    # The reference's finetuning_ARC4_Encoder_multi.yaml: its sources, weights and shots; 8000 steps, 1024 tokens.
    from arctrain.config.schema import parse_qa_source

    sources = {Path(s.path).name: (s.weight, s.shots) for s in map(parse_qa_source, cfg.data.qa.train)}
    assert len(sources) == 13 and sources["freebaseqa.jsonl"] == (27, 5) and sources["dialogsum.jsonl"] == (2.5, 3)
    assert sources["low_res_mid_translation.jsonl"] == (0.5, 2) and sources["samsum.jsonl"] == (2.5, 4)
    assert (cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, cfg.data.micro_batch_size) == (
        8000,
        50,
        0.0,
        8,
    )
    assert (cfg.data.qa.max_passages, cfg.data.qa.context, cfg.data.qa.context_tokens) == (4, "joint", 1024)


def test_the_long_context_config_cuts_1024_token_chunks_and_fits_the_window():
    cfg = load_config(REPO_ROOT / "configs" / "llama_mistral_long_context.yaml")
    assert (cfg.data.chunk_tokens, cfg.data.max_chunks, cfg.model.pooling_factor) == (1024, 5, 4)
    assert cfg.data.qa.train and cfg.train.init_from and cfg.train.decoder_schedule == "fair"
    assert 1 + cfg.data.max_chunks * cfg.data.chunk_tokens // cfg.model.pooling_factor + 1 < 4096  # a 4k window


@pytest.mark.parametrize("ds_file", DS_FILES, ids=lambda p: p.name)
def test_deepspeed_files_fill_in_and_pass_deepspeed_validation(ds_file, tmp_path):
    precision = "fp32" if "cpu" in ds_file.name else "bf16"
    overrides = [f"deepspeed={ds_file}", f"train.precision={precision}", "data.micro_batch_size=3"]
    cfg = load_config(write(tmp_path), [*overrides, "train.grad_accum=2", "optim.clip=0.5"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["zero_optimization"]["stage"] == 3
    checked = DeepSpeedConfig(deepspeed_config(cfg, world_size=1))  # world size 1: no process group here
    assert checked.zero_config.stage == 3 and checked.train_batch_size == 6


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    text = BASE + "optim:\n  encoder_lr: 2e-5\n  warmup_steps: 50\n"  # PyYAML reads 2e-5 as a string
    cfg = load_config(write(tmp_path, text), ["optim.warmup_steps=7", "decoders.1.path=/x", "data.shards=a:1,b:3"])
    assert cfg.optim.encoder_lr == 2e-5  # YAML over default
    assert cfg.optim.warmup_steps == 7  # CLI over YAML
    assert cfg.optim.projector_lr == 5e-5 and cfg.train.grad_accum == 1  # defaults
    assert cfg.decoders[1].path == "/x" and cfg.decoders[1].weight == 2.0
    assert cfg.data.sources == [("a", 1.0), ("b", 3.0)]
    assert cfg.data.val_dirs == ["a", "b"]


def test_cli_strings_are_coerced_to_field_types(tmp_path):
    overrides = [
        "train.decoder_checkpointing=true",
        "model.n_vectors=4",
        "optim.betas=[0.8,0.9]",
        "logging.wandb_entity=null",
        "train.steps=1e3",
        "data.val_shards=/v1,/v2",
        "decoders.2.name=qwen",  # one past the end appends a decoder
        "decoders.2.path=/m/qwen",
        "decoders.0.prefix=Document: ",
    ]
    cfg = load_config(write(tmp_path), overrides)
    assert cfg.train.decoder_checkpointing is True and cfg.model.n_vectors == 4
    assert cfg.optim.betas == [0.8, 0.9] and cfg.logging.wandb_entity is None and cfg.train.steps == 1000
    assert cfg.data.val_dirs == ["/v1", "/v2"] and cfg.decoders[2].name == "qwen"
    assert cfg.decoders[0].prefix == "Document: "
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg


def test_shards_accept_a_list_of_dirs_or_weighted_dirs(tmp_path):
    text = BASE.replace("  shards: /d/shards", "  shards: [/d/a, '/d/b:0.5', 'C:/odd:name']")
    cfg = load_config(write(tmp_path, text))
    assert cfg.data.sources == [("/d/a", 1.0), ("/d/b", 0.5), ("C:/odd:name", 1.0)]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "optim.lrr: unknown key"),
        (["train.steps=abc"], "train.steps: 'abc' is not a number (command line 'train.steps=abc')"),
        (["train.steps=2.5"], "train.steps: 2.5 is not of type int"),
        (["train.precision=fp16"], "train.precision: 'fp16' is not one of 'fp32', 'bf16'"),
        (["decoders.1.name=llama"], "decoders.1.name: 'llama' is not unique"),
        (["decoders.0.name=Llama-3"], "decoders.0.name: 'Llama-3' must match [a-z0-9_]+"),
        (["decoders.1.weight=0"], "decoders.1.weight: 0.0 must be > 0"),
        (["decoders.5.path=/x"], "decoders.5: no such list item (the list has 2)"),
        (["decoders.2.name=x"], "decoders.2.path: missing required key"),
        (["data.task_ratio=1.5"], "data.task_ratio: 1.5 must be in [0, 1]"),
        (["data.task_ratio=-0.1"], "data.task_ratio: -0.1 must be in [0, 1]"),
        (["data.shards=/a:0"], "data.shards: '/a:0' must have a weight > 0"),
        (["train.precision=bf16"], "train.precision: 'bf16' but ds_configs/zero3_cpu.json does not enable bf16"),
        (["deepspeed=ds_configs/zero3_bf16.json"], "train.precision: 'fp32' but ds_configs/zero3_bf16.json enables"),
        (["deepspeed=/nope.json"], "deepspeed: '/nope.json' is not a file"),
        (["model.pooling=max"], "model.pooling: 'max' is not one of"),
        (["logging.wandb_mode=on"], "logging.wandb_mode: 'on' is not one of 'offline', 'online', 'disabled'"),
        (["steps=5"], "steps: unknown key"),
        (["train.steps"], "train.steps: an override must look like key=value"),
    ],
)
def test_bad_overrides_fail_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("train:\n", "trian:\n", "trian: unknown key"),
        ("    weight: 2\n", "    weight: 2\n    wieght: 3\n", "decoders.1.wieght: unknown key"),
        ("  precision: fp32\n", "  precision: fp32\n  steps: many\n", "train.steps: 'many' is not a number"),
        ("model:\n  encoder_path: /m/enc\n", "", "model: missing required key"),
        ("  shards: /d/shards\n", "  shards: []\n", "data.shards: [] must name a shard directory (or set data.qa"),
    ],
)
def test_bad_yaml_fails_naming_file_line_and_key(tmp_path, old, new, message):
    path = write(tmp_path, BASE.replace(old, new))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)
    if new:  # the offending key's own line
        line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if new.splitlines()[-1] == text)
        assert f"{path}:{line})" in str(err.value)


def test_bf16_runs_reduce_gradients_in_fp32_unless_the_file_says_otherwise(tmp_path):
    ds = json.loads((REPO_ROOT / "ds_configs/zero3_bf16.json").read_text())
    ds.pop("communication_data_type", None)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = load_config(write(tmp_path), [f"deepspeed={tmp_path / 'ds.json'}", "train.precision=bf16"])
    assert DeepSpeedConfig(deepspeed_config(cfg, world_size=1)).communication_data_type == torch.float32
    (tmp_path / "ds.json").write_text(json.dumps({**ds, "communication_data_type": "bf16"}))  # an explicit choice
    assert DeepSpeedConfig(deepspeed_config(cfg, world_size=1)).communication_data_type == torch.bfloat16
    fp32 = load_config(write(tmp_path), ["train.precision=fp32"])  # zero3_cpu.json: the parameters are fp32 anyway
    assert DeepSpeedConfig(deepspeed_config(fp32, world_size=1)).communication_data_type is None


def test_the_zero_stage_is_the_configs(tmp_path):
    cfg = load_config(write(tmp_path), ["train.zero_stage=2"])
    assert deepspeed_config(cfg, world_size=16, per_node=8)["zero_optimization"]["stage"] == 2
    cfg = load_config(write(tmp_path), ["train.zero_hpz=true"])
    zero = deepspeed_config(cfg, world_size=16, per_node=8)["zero_optimization"]
    assert zero["stage"] == 3 and zero["zero_hpz_partition_size"] == 8
    for overrides, message in [
        (["train.zero_stage=1"], "train.zero_stage: 1 must be 2 or 3"),
        (["train.zero_stage=2", "train.zero_hpz=true"], "train.zero_hpz: True needs zero_stage 3"),
        (["train.zero_stage=2", "model.frozen_decoders=partitioned"], "model.frozen_decoders: 'partitioned' must be"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config(write(tmp_path), overrides)


def test_deepspeed_file_must_agree_with_the_config(tmp_path):
    ds = json.loads((REPO_ROOT / "ds_configs/zero3_cpu.json").read_text())

    def load_with(**fields) -> Config:
        (tmp_path / "ds.json").write_text(json.dumps({**ds, **fields}))
        return load_config(write(tmp_path), [f"deepspeed={tmp_path / 'ds.json'}", "data.micro_batch_size=4"])

    assert load_with(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps="auto").data.micro_batch_size == 4
    cases = [
        ({"train_micro_batch_size_per_gpu": 8}, "data.micro_batch_size: 4 disagrees with train_micro_batch_size_per"),
        ({"gradient_accumulation_steps": 2}, "train.grad_accum: 1 disagrees with gradient_accumulation_steps=2"),
        ({"gradient_clipping": 0.3}, "optim.clip: 1.0 disagrees with gradient_clipping=0.3"),
        ({"fp16": {"enabled": True}}, "enables fp16"),
        ({"optimizer": {"type": "Adam"}}, "has an 'optimizer' section"),
        ({"zero_optimization": {"stage": 2}}, "train.zero_stage: 3 disagrees with zero_optimization.stage=2"),
        ({"zero_optimization": {"stage": 3, "overlap_com": True}}, "is rejected by DeepSpeed"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            load_with(**fields)

    cfg = load_with(train_batch_size=8)  # right for 2 ranks only
    assert deepspeed_config(cfg, world_size=2)["train_batch_size"] == 8
    with pytest.raises(ConfigError, match="train_batch_size=8 .* world_size = 16"):
        deepspeed_config(cfg, world_size=4)


def test_check_paths_names_the_missing_directory(tmp_path):
    cfg = load_config(write(tmp_path))
    with pytest.raises(ConfigError, match="model.encoder_path: '/m/enc' is not a directory"):
        check_paths(cfg)
    for sub in ("enc", "llama", "mistral", "shards"):
        (tmp_path / sub).mkdir()
    overrides = [f"model.encoder_path={tmp_path}/enc", f"decoders.0.path={tmp_path}/llama"]
    cfg = load_config(
        write(tmp_path), [*overrides, f"decoders.1.path={tmp_path}/gone", f"data.shards={tmp_path}/shards"]
    )
    with pytest.raises(ConfigError, match="decoders.1.path: .*gone' is not a directory"):
        check_paths(cfg)


def test_config_objects_validate_on_construction():
    cfg = load_config(
        None,
        [
            "model.encoder_path=/e",
            "decoders.0.name=a",
            "decoders.0.path=/a",
            "data.shards=/s",
            "train.precision=fp32",
            "deepspeed=ds_configs/zero3_cpu.json",
        ],
    )
    assert isinstance(cfg, Config) and cfg.checkpoint.dir == "runs/arctrain"
    with pytest.raises(ValueError, match="decoders: \\[\\] must list at least one decoder"):
        Config(model=cfg.model, decoders=[], data=cfg.data)


def test_attention_is_packed_and_other_values_are_refused(tmp_path):
    """One attention path (packed, arctrain/model/attention.py); a padded implementation is refused in one line."""
    for key in ("model.attn_implementation", "decoders.1.attn_implementation"):
        with pytest.raises(
            ConfigError, match=rf"^{key.replace('.', '[.]')}: 'flash_attention_2' is not one of 'packed'"
        ):
            load_config(write(tmp_path), [f"{key}=flash_attention_2"])
    cfg = load_config(write(tmp_path))
    assert cfg.model.attn_implementation == "packed" and {d.attn_implementation for d in cfg.decoders} == {"packed"}


@pytest.mark.parametrize(
    "name", ["llama_mistral_1node.yaml", "llama_mistral_8node.yaml", "llama_mistral_finetune.yaml"]
)
def test_gpu_configs_use_packed_attention(name):
    cfg = load_config(REPO_ROOT / "configs" / name)
    assert cfg.model.attn_implementation == "packed"
    assert {d.attn_implementation for d in cfg.decoders} == {"packed"}
