"""A checkpoint of the reference ARC-Encoder (kyutai-labs/ARC-Encoder) -> an arctrain export.

    arctrain import-arc ARC8_Encoder_Llama --out imported/arc8_llama --backbone models/Llama-3.2-3B --decoders llama
    arctrain import-arc ckpts/checkpoint_080000 --out imported/multi --backbone models/Llama-3.2-3B \\
        --decoders llama,mistral --overwrite

SRC is either layout the reference writes:
- its Hugging Face release (`EmbedAugModel.save_pretrained`): config.json with model_args, embedder_args,
  bridge_args, empty_init (number of decoders), and model.safetensors with `embedder.*` / `bridge_module.*` keys;
- its training layout: params.json (embedder_params, bridge_module), embedder/consolidated.safetensors and
  bridge_module/consolidated.safetensors (the same names without the prefixes).

BACKBONE_DIR is the encoder's backbone as a local Hugging Face directory (Llama-3.2-3B for the released models): its
tokenizer goes into the export and its config.json gives the architecture (checked against model_args when SRC has
them). The reference computes in Meta's layout (interleaved RoPE pairs); the q/k rows are permuted into Hugging
Face's (half-split) layout, and RoPE is plain with the reference's rope_theta (`rope: plain`, no Llama-3 scaling).
`--decoders` names the decoders in the reference's order (projector and special vectors 0, 1, ...; default
decoder0, decoder1, ...). The output is what `arctrain export` writes (float32), ready for `arctrain generate/eval
--model DIR` and `train.init_from=DIR`. Every bad input is one line, and nothing is written.
"""

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from arctrain.export.hf.configuration_arc import ARCEncoderConfig
from arctrain.export.write import check_out, write_export
from arctrain.model.build import DECODER_NAME, plain_rope
from data_tools.tokenizer_id import tokenizer_hash

LAYER_KEY = re.compile(r"layers\.(\d+)\.(attention\.w[qkvo]|attention_norm|ffn_norm|feed_forward\.w[123])\.weight")
HF_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
SPECIAL_KEY = re.compile(r"(rec|cont)_tok\.(\d+)\.weight")
BRIDGE_KEY = re.compile(r"(?:(\d+)\.)?layer([12])\.weight")

# The segment length the export advertises: arctrain's default (the reference encodes a whole passage as one
# sequence; its encoder was trained on 256-token windows, docs/ARCHITECTURE.md section 7).
SEGMENT_TOKENS = 256


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="arctrain import-arc", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="reference checkpoint: HF release dir or training checkpoint dir")
    parser.add_argument("--out", required=True, type=Path, help="output directory (an arctrain export)")
    parser.add_argument("--backbone", required=True, type=Path, help="the encoder backbone's Hugging Face directory")
    parser.add_argument("--decoders", default="", help="decoder names in the reference's order, comma-separated")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --out")
    return parser.parse_args(argv)


# --- reading the reference's files ---------------------------------------------------------------------------


def read_reference(src: Path) -> tuple[dict, dict, dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """(model_args or {}, pipeline args {embedder, bridge, n_decoders}, embedder weights, bridge weights, layout)."""

    if (src / "config.json").is_file():
        config = _read_json(src / "config.json")
        for key in ("model_args", "embedder_args", "bridge_args"):
            if not isinstance(config.get(key), dict):
                raise ValueError(f"{src / 'config.json'}: no {key!r} mapping; not a reference ARC-Encoder release")
        weights = src / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing (the release's weights)")
        state = load_file(weights)
        other = sorted(k for k in state if not k.startswith(("embedder.", "bridge_module.")))
        if other:
            raise ValueError(f"{weights}: unknown keys {other[:3]} (expected embedder.* and bridge_module.*)")
        embedder = {k.removeprefix("embedder."): v for k, v in state.items() if k.startswith("embedder.")}
        bridge = {k.removeprefix("bridge_module."): v for k, v in state.items() if k.startswith("bridge_module.")}
        args = {"embedder": config["embedder_args"], "bridge": config["bridge_args"], "where": src / "config.json"}
        args["n_decoders"] = config.get("empty_init") or None
        return config["model_args"], args, embedder, bridge, "Hugging Face release (config.json + model.safetensors)"
    if (src / "params.json").is_file():
        params = _read_json(src / "params.json")
        for key in ("embedder_params", "bridge_module"):
            if not isinstance(params.get(key), dict):
                raise ValueError(f"{src / 'params.json'}: no {key!r} mapping; not a reference ARC-Encoder checkpoint")
        files = [src / "embedder" / "consolidated.safetensors", src / "bridge_module" / "consolidated.safetensors"]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (the training layout has embedder/ and bridge_module/)")
        args = {"embedder": params["embedder_params"], "bridge": params["bridge_module"], "n_decoders": None}
        args["where"] = src / "params.json"
        return {}, args, load_file(files[0]), load_file(files[1]), "training checkpoint (params.json + consolidated)"
    raise FileNotFoundError(f"{src}: neither config.json (HF release) nor params.json (training checkpoint) found")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a JSON object")
    return data


def pooling_of(embedder: dict, where: Path) -> tuple[int, int]:
    """(factor, n_vectors) from the reference's embedder args, refusing what arctrain does not compute."""
    pooling = embedder.get("pooling_module") or {}
    refusals = [
        (embedder.get("causal_embedder", False), "causal_embedder is true (arctrain's encoder is bidirectional)"),
        (embedder.get("memory_tokens", 0), "memory_tokens > 0 (memory-token encoders are not computed by arctrain)"),
        (
            pooling.get("pool_type", "mean_pooled_queries") != "mean_pooled_queries",
            f"pool_type {pooling.get('pool_type')!r} (arctrain computes mean_pooled_queries)",
        ),
        (
            pooling.get("where", "before") != "before",
            f"pooling where={pooling.get('where')!r} (arctrain pools before the last layer, not between sub-layers)",
        ),
        (
            not (embedder.get("rec_tok") and embedder.get("cont_tok")),
            "rec_tok/cont_tok not both true (arctrain always has a <Rec> and a <Cont> vector per decoder)",
        ),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"{where}: {why}")
    rates = embedder.get("compress_rates") or []
    if len(rates) != 1 or not isinstance(rates[0], int):
        raise ValueError(f"{where}: compress_rates {rates!r}: arctrain pools in the last layer only (one rate)")
    rate = rates[0]
    if rate <= -1:
        return -rate, 0  # a factor (-1: every token its own group)
    return 1, max(rate, 1)  # a fixed number of vectors (0: the whole segment in one)


def architecture(model_args: dict, backbone, where: Path) -> dict:
    """The reference's encoder shapes, from model_args where SRC has them (checked against BACKBONE_DIR), else
    from the backbone's config. n_layers counts the layers before truncation; norm_eps may be a string."""
    bb = {
        "dim": backbone.hidden_size,
        "n_layers": backbone.num_hidden_layers,
        "n_heads": backbone.num_attention_heads,
        "n_kv_heads": backbone.num_key_value_heads,
        "head_dim": getattr(backbone, "head_dim", None) or backbone.hidden_size // backbone.num_attention_heads,
        "hidden_dim": backbone.intermediate_size,
        "vocab_size": backbone.vocab_size,
        "norm_eps": backbone.rms_norm_eps,
        "rope_theta": (backbone.rope_parameters or {}).get("rope_theta"),
    }
    if not model_args:
        return bb
    if model_args.get("non_parametric_norm"):
        raise ValueError(f"{where}: model_args.non_parametric_norm is true (OLMo-style norms; arctrain needs RMSNorm)")
    arch = dict(bb)
    for key in bb:
        if key not in model_args or model_args[key] is None:
            continue
        try:
            value = float(model_args[key]) if key in ("norm_eps", "rope_theta") else int(model_args[key])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: model_args.{key}={model_args[key]!r} is not a number") from None
        if key not in ("norm_eps", "rope_theta") and value != bb[key]:
            raise ValueError(f"{where}: model_args.{key}={value} but the backbone config.json says {bb[key]}")
        arch[key] = value
    return arch


# --- converting the weights ----------------------------------------------------------------------------------


def meta_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from Meta's RoPE layout (pairs 2i, 2i+1 rotate together) to Hugging Face's (i, i + hd/2)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def convert(embedder, bridge, arch: dict, n_kept: int, names: list[str], where: Path) -> dict[str, torch.Tensor]:
    """The reference's tensors under arctrain's export names, float32."""
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in embedder.items():
        key = re.sub(r"^(rec|cont)_tok\.weight$", r"\1_tok.0.weight", key)  # older single-decoder checkpoints
        layer, special = LAYER_KEY.fullmatch(key), SPECIAL_KEY.fullmatch(key)
        if key == "tok_embeddings.weight":
            state["encoder.embed_tokens.weight"] = value
        elif layer and int(layer[1]) < n_kept:
            part = layer[2]
            if part in ("attention.wq", "attention.wk"):
                value = meta_to_hf(value, arch["n_heads"] if part == "attention.wq" else arch["n_kv_heads"])
            state[f"encoder.layers.{layer[1]}.{HF_NAMES[part]}.weight"] = value
        elif special and int(special[2]) < len(names):
            state[f"specials.{names[int(special[2])]}.{special[1]}"] = value.reshape(-1)
        elif key.startswith("mem_embeddings"):
            raise ValueError(f"{where}: the checkpoint has memory tokens ({key}); arctrain does not compute them")
        else:
            unknown.append(f"embedder.{key}")
    for key, value in bridge.items():
        match = BRIDGE_KEY.fullmatch(key)
        j = int(match[1]) if match and match[1] is not None else 0
        if match and j < len(names):
            state[f"projectors.{names[j]}.{int(match[2]) - 1}.weight"] = value
        else:
            unknown.append(f"bridge_module.{key}")
    if unknown:
        raise ValueError(f"{where}: keys arctrain does not know or that exceed the decoders: {sorted(unknown)[:3]}")
    return {k: v.float().contiguous() for k, v in state.items()}


def count_decoders(embedder: dict, bridge: dict, declared: int | None, where: Path) -> int:
    """How many decoders the checkpoint holds (its projectors and special vectors must agree)."""
    projectors = {int(m[1] or 0) for k in bridge if (m := BRIDGE_KEY.fullmatch(k))}
    specials = {int(m[2]) for k in embedder if (m := SPECIAL_KEY.fullmatch(k))} | (
        {0} if "rec_tok.weight" in embedder or "cont_tok.weight" in embedder else set()
    )
    n = len(projectors)
    if projectors != set(range(n)) or specials != set(range(n)):
        raise ValueError(f"{where}: projectors {sorted(projectors)} and special vectors {sorted(specials)} disagree")
    if declared is not None and declared != n:
        raise ValueError(f"{where}: empty_init={declared} decoders but the weights hold {n}")
    return n


# --- the import ----------------------------------------------------------------------------------------------


def import_arc(src: Path, out: Path, backbone_dir: Path, decoders: list[str], overwrite: bool = False) -> Path:
    """Write an arctrain export at `out` from a reference checkpoint at `src`; returns `out`."""
    # transformers takes seconds to import; only this path needs it
    from transformers import AutoConfig

    check_out(out, overwrite)
    if not (backbone_dir / "config.json").is_file():
        raise FileNotFoundError(f"--backbone {backbone_dir}: not a Hugging Face model directory (no config.json)")
    model_args, args, embedder, bridge, layout = read_reference(src)
    where = args["where"]
    factor, n_vectors = pooling_of(args["embedder"], where)
    bridge_type = args["bridge"].get("bridge_type")
    if bridge_type not in ("mlp", "multi_module"):
        raise ValueError(f"{where}: bridge_type {bridge_type!r}: arctrain's projector is the two-layer 'mlp'")
    n_decoders = count_decoders(embedder, bridge, args["n_decoders"], where)
    names = decoders or [f"decoder{j}" for j in range(n_decoders)]
    if len(names) != n_decoders:
        raise ValueError(f"--decoders {','.join(names)}: {len(names)} names, but {src} holds {n_decoders} decoders")
    for name in names:
        if not DECODER_NAME.fullmatch(name) or names.count(name) > 1:
            raise ValueError(f"--decoders: name {name!r} must be unique and match [a-z0-9_]+")

    backbone = AutoConfig.from_pretrained(backbone_dir, local_files_only=True)
    arch = architecture(model_args, backbone, where)
    n_truncated = int(args["embedder"].get("n_truncated_layers", 0))
    n_kept = arch["n_layers"] - n_truncated
    if not 0 < n_kept <= backbone.num_hidden_layers:
        raise ValueError(f"{where}: n_truncated_layers={n_truncated} of {arch['n_layers']} layers leaves none")
    backbone.num_hidden_layers = n_kept
    backbone.rms_norm_eps = arch["norm_eps"]
    backbone.rope_parameters = {**(backbone.rope_parameters or {}), "rope_theta": arch["rope_theta"]}
    plain_rope(backbone)  # the reference's RoPE: unscaled, its rope_theta
    backbone_dict = backbone.to_dict()
    backbone_dict["model_type"] = backbone.model_type
    backbone_dict.pop("architectures", None)
    # The release's weights are float32; a backbone config saying bfloat16 (as the Hub's Llama-3.2-3B does) must
    # not lower them (the vectors would no longer equal the reference's).
    backbone_dict.pop("torch_dtype", None)
    backbone_dict["dtype"] = "float32"

    state = convert(embedder, bridge, arch, n_kept, names, where)
    entries = []
    for name in names:
        hidden, out_dim = (tuple(state[f"projectors.{name}.{i}.weight"].shape)[0] for i in (0, 1))
        entries.append(
            {
                "name": name,
                "architecture": "",  # not recorded by the reference: the user brings the decoder
                "hidden_size": out_dim,
                "projector_hidden": hidden,
                "tokenizer_hash": "",
                "prefix": "",  # the reference's pretraining puts the vectors first
                "rope": "plain",  # the reference applies unscaled RoPE to its decoders too
            }
        )
    config = ARCEncoderConfig(
        backbone=backbone_dict,
        n_truncated_layers=n_truncated,
        pooling="mean_pooled_queries",
        pooling_factor=factor,
        n_vectors=n_vectors,
        segment_tokens=SEGMENT_TOKENS,
        decoders=entries,
        encoder_tokenizer_hash=tokenizer_hash(backbone_dir),
        rope="plain",
        source=str(src),
    )
    card = model_card(src, layout, backbone_dir, config)
    return write_export(out, config, state, backbone_dir, card, what=f"{src}: weights")


def model_card(src: Path, layout: str, backbone_dir: Path, config) -> str:
    rows = "\n".join(
        f"| {j} | {d['name']} | {d['hidden_size']} | {d['projector_hidden']} |" for j, d in enumerate(config.decoders)
    )
    rate = f"{config.n_vectors} vectors per segment" if config.n_vectors else f"x{config.pooling_factor}"
    return f"""---
library_name: transformers
tags: [arc-encoder, context-compression]
---
# ARC encoder imported from the reference implementation ({rate})

Source: `{src}` ({layout}), a checkpoint of the reference ARC-Encoder (kyutai-labs/ARC-Encoder), converted by
`arctrain import-arc` to float32 with the q/k rows permuted from Meta's to Hugging Face's RoPE layout. Encoder
backbone: `{backbone_dir}` (`{config.backbone["model_type"]}`, {config.backbone["num_hidden_layers"]} layers kept,
{config.n_truncated_layers} removed), bidirectional attention, mean-pooled queries in the last layer, no final norm,
plain RoPE with rope_theta {config.backbone["rope_parameters"]["rope_theta"]} (as the reference computes it).

| reference index | decoder | hidden size | projector hidden |
|---|---|---|---|
{rows}

The decoders are not included; the reference ran them with plain RoPE too (`decoders[i].rope: plain` in arctrain).

## How to load
```python
from transformers import AutoModel
model = AutoModel.from_pretrained("THIS_DIR", trust_remote_code=True)
vectors = model.compress(input_ids, attention_mask)                 # per segment (m, D)
embeds = model.project(vectors[0], "{config.decoders[0]["name"]}")  # decoder embedding space
```
Fine-tune with arctrain: `train.init_from=THIS_DIR` (ZeRO-3, any pooling factor, new decoders get new projectors).
"""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv or [])
    names = [n.strip() for n in args.decoders.split(",") if n.strip()]
    out = import_arc(args.src, args.out, args.backbone, names, args.overwrite)
    print(f"arctrain import-arc: {args.src} -> {out}")
