"""ZeRO-3 checkpoint -> Hugging Face directory that loads without arctrain.

    arctrain export --run runs/tiny_cpu --out exported/tiny            # the latest checkpoint
    arctrain export --run runs/tiny_cpu --step 40 --out exported/tiny40

CPU only. The trainable weights (encoder, projectors, special vectors) are consolidated from every rank's ZeRO-3
partition with DeepSpeed's own reader; the frozen decoders are not part of the export (users bring them). The
directory holds config.json (model_type "arc_encoder", auto_map), model.safetensors (sharded above 5GB),
configuration_arc.py / modeling_arc.py, the encoder's tokenizer and a README.md model card. Load it with

    AutoModel.from_pretrained(DIR, trust_remote_code=True)    # transformers only
    load_export(DIR)                                          # arctrain's own ARCEncoder + projectors
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from arctrain.checkpoint.checkpointer import checkpoint_dir, consolidate
from arctrain.config.load import load_config
from arctrain.config.schema import Config
from arctrain.export.hf.configuration_arc import ARCEncoderConfig
from arctrain.export.hf.modeling_arc import ARCEncoderModel
from arctrain.model.build import plain_rope
from arctrain.train.run_log import RUN_DATA
from data_tools.tokenizer_id import tokenizer_hash

MAX_SHARD_SIZE = "5GB"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="arctrain export", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run directory (checkpoint.dir of the training)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing --out directory")
    parser.add_argument(
        "--segment-tokens", type=int, help="the training segment length, for runs that did not record it"
    )
    return parser.parse_args(argv)


def segment_tokens(cfg: Config, run: Path) -> int:
    """The training segment length: the run's own record (data.json), else (runs from before it) QA's setting or
    the first shard directory's manifest."""
    if (run / RUN_DATA).is_file():
        return int(json.loads((run / RUN_DATA).read_text())["segment_tokens"])
    if cfg.data.qa.train:
        return cfg.data.chunk_tokens
    manifest = Path(cfg.data.sources[0][0]) / "manifest.json"
    if not manifest.is_file():
        raise ValueError(
            f"{run}: no {RUN_DATA} (a run from before arctrain recorded it) and {manifest} is gone: the segment length "
            "the encoder was trained on is unknown; pass --segment-tokens"
        )
    return int(json.loads(manifest.read_text())["segment_tokens"])


def export_config(cfg: Config, segment: int):
    """The ARCEncoderConfig of a run: truncated backbone config, pooling, and what each decoder needs."""
    # transformers takes seconds to import; only this path needs it
    from transformers import AutoConfig

    backbone = _model_config(cfg.model.encoder_path, "model.encoder_path")
    backbone.num_hidden_layers -= cfg.model.n_truncated_layers
    if cfg.model.rope == "plain":
        plain_rope(backbone)  # the export's backbone config says what its rotary embedding computes
    decoders = []
    for d in cfg.decoders:
        dec = _model_config(d.path, f"decoder {d.name!r} path")
        decoders.append(
            {
                "name": d.name,
                "architecture": (dec.architectures or [type(dec).__name__])[0],
                "hidden_size": dec.hidden_size,
                "projector_hidden": d.projector_hidden,
                "tokenizer_hash": tokenizer_hash(d.path),
                "prefix": d.prefix,
                "rope": d.rope,
            }
        )
    backbone_dict = backbone.to_dict()
    backbone_dict["model_type"] = backbone.model_type
    backbone_dict.pop("architectures", None)  # the backbone is used as a bare model, never as a causal LM
    assert isinstance(AutoConfig.for_model(backbone.model_type), type(backbone))
    return ARCEncoderConfig(
        backbone=backbone_dict,
        n_truncated_layers=cfg.model.n_truncated_layers,
        pooling=cfg.model.pooling,
        pooling_factor=cfg.model.pooling_factor,
        n_vectors=cfg.model.n_vectors,
        segment_tokens=segment,
        decoders=decoders,
        encoder_tokenizer_hash=tokenizer_hash(cfg.model.encoder_path),
        rope=cfg.model.rope,
        qa_context=qa_context(cfg),
    )


def qa_context(cfg: Config) -> dict | None:
    """How a QA fine-tuning run compressed its passages and whether it rendered prompts with instruct decoders' chat
    templates (`arctrain generate`/`eval` default to both); None for shards."""
    data = cfg.data
    if not data.qa.train:
        return None
    return {
        "context": data.qa.context,
        "chunk_tokens": data.chunk_tokens,
        "max_chunks": data.max_chunks,
        "context_tokens": data.qa.context_tokens,
        "chat_template": data.qa.chat_template,
    }


def frozen_encoder_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """Encoder weights the run kept frozen (`model.freeze_encoder_embeddings`): not in its checkpoints, so they come
    from the encoder's own directory, as they did when training started."""
    if not cfg.model.freeze_encoder_embeddings:
        return {}

    for file in sorted(Path(cfg.model.encoder_path).glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            key = next((k for k in weights.keys() if k.endswith("embed_tokens.weight")), None)
            if key is not None:
                return {"encoder.embed_tokens.weight": weights.get_tensor(key).float()}
    raise ValueError(f"model.encoder_path {cfg.model.encoder_path}: no embed_tokens weight in its safetensors files")


def _model_config(path: str, what: str):
    # transformers takes seconds to import; only this path needs it
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {path} is not a Hugging Face model directory (no config.json)")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def export(run: Path, out: Path, step: int | None = None, overwrite: bool = False, segment: int | None = None) -> Path:
    """Write the Hugging Face directory for a run's checkpoint; returns `out`."""
    ckpt = checkpoint_dir(run, step)
    check_out(out, overwrite)
    cfg = load_config(run / "config.yaml")
    config = export_config(cfg, segment or segment_tokens(cfg, run))
    config.source = str(ckpt)
    state = {**frozen_encoder_weights(cfg), **consolidate(ckpt)}
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    card = model_card(cfg, config, trainer_state, _last_metrics(run), ckpt)
    return write_export(out, config, state, cfg.model.encoder_path, card, what=f"{ckpt}: weights")


def check_out(out: Path, overwrite: bool) -> None:
    """A non-empty output directory is refused unless `overwrite` (checked before anything is read or written)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out}: directory is not empty (pass --overwrite to replace an export)")


def write_export(out: Path, config, state: dict[str, torch.Tensor], tokenizer_dir, card: str, what: str) -> Path:
    """The export directory from an ARCEncoderConfig and its full weights (fp32 as given): config.json with auto_map,
    model.safetensors, the two standalone files, the encoder tokenizer of `tokenizer_dir`, README.md = `card`.
    The weights are checked against the config before anything is written."""
    # transformers takes seconds to import; only this path needs it
    from transformers import AutoTokenizer

    model = ARCEncoderModel(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"{what} do not match the config (missing {missing[:3]}, extra {extra[:3]})")
    wrong = [
        f"{n} is {tuple(t.shape)}, the config says {expected[n]}"
        for n, t in state.items()
        if tuple(t.shape) != expected[n]
    ]
    if wrong:
        raise ValueError(f"{what}: shapes disagree with the config: {'; '.join(wrong[:3])}")
    model.load_state_dict(state, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Registration makes save_pretrained copy the two standalone files and write config.json's auto_map.
    ARCEncoderConfig.register_for_auto_class()
    ARCEncoderModel.register_for_auto_class("AutoModel")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a smaller model may be written in fewer shards
    model.save_pretrained(out, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card)
    return out


def _last_metrics(run: Path) -> dict:
    """The latest value of every metric in metrics.jsonl (train and eval lines are written at different steps)."""
    latest: dict = {}
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            latest.update(json.loads(line))
    return latest


def model_card(cfg: Config, config, trainer_state: dict, metrics: dict, ckpt: Path) -> str:
    """README.md: what the model is, what it was trained on, how far, and how to load it."""
    decoders = "\n".join(
        f"| {d['name']} | {d['architecture']} | {d['hidden_size']} | {d['projector_hidden']} "
        f"| `{d['tokenizer_hash'][:16]}` |"
        for d in config.decoders
    )
    paths = {d.name: d.path for d in cfg.decoders}
    bases = "\n".join([f"- encoder backbone: `{cfg.model.encoder_path}`"] + [f"- {n}: `{p}`" for n, p in paths.items()])
    shown = {k: v for k, v in sorted(metrics.items()) if "loss" in k or k in ("step", "grad_norm")}
    metric_rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items()
    )
    return f"""---
library_name: transformers
tags: [arc-encoder, context-compression]
---
# ARC encoder ({config.pooling}, x{config.pooling_factor})

A context compressor: the encoder turns each segment of up to {config.segment_tokens} tokens into about
1/{config.pooling_factor} as many vectors ({_pooling_words(config)}); a per-decoder projector maps them into a
frozen decoder's embedding space, where they replace the context's tokens. Trained with arctrain.

## Base models
{bases}

Encoder backbone: `{config.backbone["model_type"]}`, {config.backbone["num_hidden_layers"]} layers kept
({config.n_truncated_layers} removed), bidirectional attention, no final norm. Decoders (not included):

| name | architecture | hidden size | projector hidden | tokenizer sha256 |
|---|---|---|---|---|
{decoders}

## Training
- checkpoint: `{ckpt}` (step {trainer_state.get("step")}, world size {trainer_state.get("world_size")})
- data: {_data_lines(cfg)}
- steps: {cfg.train.steps} planned, {trainer_state.get("step")} done; micro-batch {cfg.data.micro_batch_size}, \
grad accumulation {cfg.train.grad_accum}; LR encoder {cfg.optim.encoder_lr}, projector {cfg.optim.projector_lr}

Final metrics (latest value of each in metrics.jsonl):

| metric | value |
|---|---|
{metric_rows}

## How to load
```python
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained("THIS_DIR", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained("THIS_DIR", trust_remote_code=True)
if tok.pad_token is None:  # e.g. Llama 3's tokenizer; padding is masked out, so any token can pad
    tok.pad_token = tok.eos_token
enc = tok(["some text", "a longer text"], return_tensors="pt", padding=True, add_special_tokens=False)
vectors = model.compress(enc.input_ids, enc.attention_mask)        # per segment (m, D)
embeds = model.project(vectors[0], "{config.decoders[0]["name"]}")  # decoder embedding space
```
With arctrain: `arctrain generate --model THIS_DIR --decoder DECODER_DIR --context-file doc.txt --prompt "..."`
and `arctrain eval --model THIS_DIR --decoder DECODER_DIR --data qa.jsonl`.
"""


def _pooling_words(config) -> str:
    if config.n_vectors > 0:
        return f"{config.n_vectors} vectors per segment"
    return "mean-pooled queries in the last layer" if config.pooling == "mean_pooled_queries" else "mean pooling"


def _data_lines(cfg: Config) -> str:
    if cfg.data.qa.train:
        files = ", ".join(f"`{entry}`" for entry in cfg.data.qa.train)
        d = cfg.data
        if d.qa.context == "segments":
            cut = f"passages in chunks of {d.chunk_tokens} encoder tokens, at most {d.max_chunks or 'all'}"
        else:
            cut = f"passages jointly, at most {d.qa.context_tokens} encoder tokens"
        return (
            f"QA fine-tuning on {files} from `{cfg.train.init_from or 'its own initialisation'}`; {cut} "
            "(`qa_context` in config.json: what generate and eval do by default)"
        )
    parts = []
    for directory, weight in cfg.data.sources:
        manifest = Path(directory) / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            train = m.get("splits", {}).get("train", {})
            tokens = sum(s.get("tokens", {}).get("encoder", 0) for s in train.get("shards", []))
            parts.append(f"`{directory}` (weight {weight}: {train.get('samples')} samples, {tokens} encoder tokens)")
        else:
            parts.append(f"`{directory}` (weight {weight}, manifest not found at export time)")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv or [])
    out = export(args.run, args.out, args.step, args.overwrite, args.segment_tokens)
    print(f"arctrain export: {args.run} -> {out}")
