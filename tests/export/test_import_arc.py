"""`arctrain import-arc`: tiny checkpoints in both layouts of the reference ARC-Encoder (kyutai-labs/ARC-Encoder),
written here from our reading of its format, imported, and compared with the reference's math written here too
(Meta weight layout, RoPE on interleaved pairs as complex numbers, its group rule), in fp32; bad inputs; and the
round trip import -> train.init_from (2 ZeRO-3 ranks, LR 0, another pooling factor) -> export.

The unit tests take about 20 s; the round trip about a minute (2 gloo processes, 2 steps, then an export).
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import backbone_dims, embedder_args, reference_weights, write_release
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

from arctrain.cli import main as arctrain
from arctrain.export.load import load_export

TEXTS = [
    "Return the absolute value of the argument, which may be an integer or a float.",
    "Hi",  # shorter than the factor: one vector
    "The module provides an interface to the operating system, with functions for files and processes.",
]


# --- a tiny reference checkpoint, in the reference's own names and Meta layout -------------------------------


def write_training_layout(path: Path, a: dict, emb, bridge, rate: int, n_dec: int, hidden: int, out_dim: int, **extra):
    """The reference's training checkpoint: params.json of the pipeline, embedder/ and bridge_module/."""
    (path / "embedder").mkdir(parents=True)
    (path / "bridge_module").mkdir()
    params = {
        "param_dtype": "float32",
        "embedder_params": embedder_args(rate, **extra),
        "bridge_module": {
            "bridge_type": "multi_module" if n_dec > 1 else "mlp",
            "in_dim": a["dim"],
            "hidden_dim": hidden,
            "out_dim": out_dim,
        },
    }
    (path / "params.json").write_text(json.dumps(params))
    save_file(emb, path / "embedder" / "consolidated.safetensors")
    save_file(bridge, path / "bridge_module" / "consolidated.safetensors")


# --- the reference's math, written from its equations ----------------------------------------------------------


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_pairs(x, positions, theta):
    """x (T, H, hd): dims (2i, 2i+1) are one complex number, rotated by pos * theta^(-2i/hd)."""
    hd = x.shape[-1]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    angles = torch.tensor(list(positions), dtype=torch.float64)[:, None] * freqs  # (T, hd/2)
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None, :]  # (T, 1, hd/2)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * rot).flatten(-2)


def block(w: dict, i: int, a: dict, x, kv=None):
    """The reference's TransformerBlock(x, other_kv=kv): both normed by attention_norm; queries at 0..len(x)-1."""
    p, eps = f"layers.{i}.", a["norm_eps"]
    kv = x if kv is None else kv
    xn, kvn = rms(x, w[p + "attention_norm.weight"], eps), rms(kv, w[p + "attention_norm.weight"], eps)
    h, g, hd = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    q = (xn @ w[p + "attention.wq.weight"].T).view(len(x), h, hd)
    k = (kvn @ w[p + "attention.wk.weight"].T).view(len(kv), g, hd)
    v = (kvn @ w[p + "attention.wv.weight"].T).view(len(kv), g, hd)
    q, k = rope_pairs(q, range(len(x)), a["rope_theta"]), rope_pairs(k, range(len(kv)), a["rope_theta"])
    k, v = k.repeat_interleave(h // g, dim=1), v.repeat_interleave(h // g, dim=1)
    att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd), dim=-1)  # no mask: bidirectional
    out = torch.einsum("hqk,khd->qhd", att, v).reshape(len(x), h * hd) @ w[p + "attention.wo.weight"].T
    x = x + out
    y = rms(x, w[p + "ffn_norm.weight"], eps)
    ff = torch.nn.functional.silu(y @ w[p + "feed_forward.w1.weight"].T) * (y @ w[p + "feed_forward.w3.weight"].T)
    return x + ff @ w[p + "feed_forward.w2.weight"].T


def group_sizes(n: int, rate: int) -> list[int]:
    """The reference's rule: rate -x (factor) or k > 0 (count), near-equal groups, larger first."""
    if rate > 0:
        m = n if n < rate else rate
    else:
        x = -rate
        m = 1 if n < x else (n // x if n % x == 0 else n // x + 1)
    return [n // m + (g < n % m) for g in range(m)]


def reference_compress(w: dict, a: dict, n_kept: int, ids: list[int], rate: int) -> torch.Tensor:
    h = w["tok_embeddings.weight"][ids]
    for i in range(n_kept - 1):
        h = block(w, i, a, h)
    bounds = [0]
    for size in group_sizes(len(ids), rate):
        bounds.append(bounds[-1] + size)
    means = torch.stack([h[s:e].mean(0) for s, e in zip(bounds[:-1], bounds[1:], strict=True)])
    return block(w, n_kept - 1, a, means, kv=h)  # no final norm


def reference_project(bridge: dict, j: int, multi: bool, x):
    p = f"{j}." if multi else ""
    return x @ bridge[p + "layer1.weight"].T @ bridge[p + "layer2.weight"].T


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone(tiny_models, tmp_path_factory) -> Path:
    """The tiny encoder backbone with Llama-3 RoPE scaling in its config: the import must not apply it."""
    path = tmp_path_factory.mktemp("backbone") / "llama3_scaled"
    shutil.copytree(tiny_models / "encoder", path)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


def inputs(tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)
    enc = tok(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = [row[: int(m.sum())].tolist() for row, m in zip(enc.input_ids, enc.attention_mask, strict=True)]
    return enc.input_ids, enc.attention_mask, ids


CASES = {
    # name: (layout, decoders' output dims, compress rate, old special-vector names)
    "release_single_x8": ("release", [128], -8, True),
    "release_multi_x4": ("release", [128, 160], -4, False),
    "training_multi_x8": ("training", [128, 160], -8, False),
    "training_single_3_vectors": ("training", [160], 3, False),
}


@pytest.mark.parametrize("case", CASES)
def test_import_computes_the_reference(case, backbone, tmp_path, capsys):
    layout, out_dims, rate, old = CASES[case]
    a = backbone_dims(backbone)
    n_kept, hidden = a["n_layers"] - 2, 48
    emb, bridge = reference_weights(a, n_kept, out_dims, hidden, old_names=old)
    src = tmp_path / "src"
    write = write_release if layout == "release" else write_training_layout
    write(src, a, emb, bridge, rate, len(out_dims), hidden, out_dims[0])
    names = ["llama", "mistral"][: len(out_dims)]
    out = tmp_path / "out"
    arctrain(["import-arc", str(src), "--out", str(out), "--backbone", str(backbone), "--decoders", ",".join(names)])
    assert f"-> {out}" in capsys.readouterr().out

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "arc_encoder" and config["rope"] == "plain" and config["source"] == str(src)
    assert config["backbone"]["rope_parameters"]["rope_type"] == "default"
    assert config["backbone"]["num_hidden_layers"] == n_kept
    assert [d["rope"] for d in config["decoders"]] == ["plain"] * len(names)
    assert str(src) in (out / "README.md").read_text()
    for name in ("configuration_arc.py", "modeling_arc.py", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name

    ids, mask, segments = inputs(out)
    hf = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    encoder, projectors, specials, _ = load_export(out)
    with torch.no_grad():
        by_hf, by_arctrain = hf.compress(ids, mask), encoder.compress(ids, mask)
        for seg, got_hf, got_ours in zip(segments, by_hf, by_arctrain, strict=True):
            want = reference_compress(emb, a, n_kept, seg, rate)
            assert got_hf.shape == want.shape == got_ours.shape
            assert rel_err(got_hf, want) < 1e-5 and rel_err(got_ours, want) < 1e-5, (case, len(seg))
        vectors = torch.cat(by_hf)
        for j, name in enumerate(names):
            want = reference_project(bridge, j, len(names) > 1, vectors)
            assert rel_err(hf.project(vectors, name), want) < 1e-5
            assert rel_err(projectors[name](vectors), want) < 1e-5
            tag = "" if old else f".{j}"
            for kind in ("rec", "cont"):
                torch.testing.assert_close(hf.special(name, kind), emb[f"{kind}_tok{tag}.weight"][0], rtol=0, atol=0)
                torch.testing.assert_close(getattr(specials[name], kind), emb[f"{kind}_tok{tag}.weight"][0])


def test_default_decoder_names_and_overwrite(backbone, tmp_path):
    a = backbone_dims(backbone)
    emb, bridge = reference_weights(a, a["n_layers"] - 2, [128, 160], 48)
    write_release(tmp_path / "src", a, emb, bridge, -8, 2, 48, 128)
    out = tmp_path / "out"
    arctrain(["import-arc", str(tmp_path / "src"), "--out", str(out), "--backbone", str(backbone)])
    assert [d["name"] for d in json.loads((out / "config.json").read_text())["decoders"]] == ["decoder0", "decoder1"]
    with pytest.raises(SystemExit):
        arctrain(["import-arc", str(tmp_path / "src"), "--out", str(out), "--backbone", str(backbone)])
    arctrain(["import-arc", str(tmp_path / "src"), "--out", str(out), "--backbone", str(backbone), "--overwrite"])


# --- bad inputs: one line each, nothing written ------------------------------------------------------------


def _drop(key):
    return lambda emb, bridge: emb.pop(key)


def _bad_shape(emb, bridge):
    emb["layers.0.attention.wv.weight"] = emb["layers.0.attention.wv.weight"][:-1]


def _unknown(emb, bridge):
    emb["layers.0.attention.extra.weight"] = torch.zeros(2)


def _extra_layer(emb, bridge):
    emb["layers.9.ffn_norm.weight"] = torch.zeros(2)


BAD = {
    "missing layer tensor": ({"mutate": _drop("layers.1.feed_forward.w2.weight")}, "missing ['encoder.layers.1.mlp"),
    "shape": ({"mutate": _bad_shape}, "layers.0.self_attn.v_proj.weight is (47, 96), the config says (48, 96)"),
    "unknown key": ({"mutate": _unknown}, "keys arctrain does not know"),
    "layer past the kept ones": ({"mutate": _extra_layer}, "embedder.layers.9.ffn_norm.weight"),
    "decoders count": ({"decoders": "a,b,c"}, "3 names, but"),
    "bad decoder name": ({"decoders": "Llama,b"}, "name 'Llama' must be unique"),
    "memory tokens": ({"extra": {"memory_tokens": 8}}, "memory_tokens > 0"),
    "causal": ({"extra": {"causal_embedder": True}}, "causal_embedder is true"),
    "pool type": ({"extra": {"pooling_module": {"pool_type": "mean", "where": "before"}}}, "pool_type 'mean'"),
    "between": (
        {"extra": {"pooling_module": {"pool_type": "mean_pooled_queries", "where": "between"}}},
        "where='between'",
    ),
    "two rates": ({"extra": {"compress_rates": [-2, -4]}}, "compress_rates [-2, -4]"),
    "no cont": ({"extra": {"cont_tok": False}}, "rec_tok/cont_tok not both true"),
    "model_args": ({"dim": 64}, "model_args.dim=64 but the backbone config.json says 96"),
    "missing weights": ({"delete": "model.safetensors"}, "model.safetensors: missing"),
    "not a checkpoint": ({"delete": "config.json"}, "neither config.json"),
    "bridge type": ({"config": ("bridge_args", "bridge_type", "rms")}, "bridge_type 'rms'"),
    "empty_init": ({"config": ("empty_init", None, 3)}, "empty_init=3 decoders but the weights hold 2"),
    "norm_eps": ({"config": ("model_args", "norm_eps", "tiny")}, "model_args.norm_eps='tiny' is not a number"),
    "olmo norms": ({"config": ("model_args", "non_parametric_norm", True)}, "non_parametric_norm is true"),
}


@pytest.mark.parametrize("bad", BAD)
def test_bad_input_is_one_line_and_writes_nothing(bad, backbone, tmp_path, capsys):
    how, message = BAD[bad]
    a = backbone_dims(backbone)
    emb, bridge = reference_weights(a, a["n_layers"] - 2, [128, 160], 48)
    if "mutate" in how:
        how["mutate"](emb, bridge)
    src = tmp_path / "src"
    write_release(src, {**a, "dim": how.get("dim", a["dim"])}, emb, bridge, -8, 2, 48, 128, **how.get("extra", {}))
    if "delete" in how:
        (src / how["delete"]).unlink()
    if "config" in how:
        section, key, value = how["config"]
        config = json.loads((src / "config.json").read_text())
        if key is None:
            config[section] = value
        else:
            config[section][key] = value
        (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    args = ["import-arc", str(src), "--out", str(out), "--backbone", str(backbone)]
    with pytest.raises(SystemExit) as exit_info:
        arctrain(args + ["--decoders", how.get("decoders", "llama,mistral")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_training_layout_without_bridge_file(backbone, tmp_path, capsys):
    a = backbone_dims(backbone)
    emb, bridge = reference_weights(a, a["n_layers"] - 2, [128], 48)
    write_training_layout(tmp_path / "src", a, emb, bridge, -8, 1, 48, 128)
    (tmp_path / "src" / "bridge_module" / "consolidated.safetensors").unlink()
    with pytest.raises(SystemExit):
        arctrain(["import-arc", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--backbone", str(backbone)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bridge_module/consolidated.safetensors: missing" in err
    assert not (tmp_path / "o").exists()


def test_rope_choice_is_honoured_on_load(backbone):
    """`rope: plain` drops the checkpoint's Llama-3 scaling, in arctrain's loader and in the standalone export;
    `rope: checkpoint` keeps it."""
    from transformers import AutoConfig

    from arctrain.config.schema import ModelConfig
    from arctrain.export.hf.configuration_arc import ARCEncoderConfig
    from arctrain.export.hf.modeling_arc import ARCEncoderModel
    from arctrain.model.build import build_encoder, load_causal_lm

    hd = backbone_dims(backbone)["head_dim"]
    plain = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    kept = load_causal_lm(backbone, torch.float32, rope="checkpoint").model.rotary_emb.inv_freq
    dropped = load_causal_lm(backbone, torch.float32, rope="plain").model.rotary_emb.inv_freq
    torch.testing.assert_close(dropped, plain)
    assert not torch.allclose(kept, plain)  # the scaling changes the low frequencies
    for rope, want_plain in (("plain", True), ("checkpoint", False)):  # model.rope reaches the trainer's encoder
        cfg = ModelConfig(encoder_path=str(backbone), n_truncated_layers=2, rope=rope)
        assert torch.allclose(build_encoder(cfg, torch.float32).rotary_emb.inv_freq, plain) == want_plain, rope
    scaled = AutoConfig.from_pretrained(backbone).to_dict()
    for rope, want_plain in (("plain", True), ("checkpoint", False)):
        model = ARCEncoderModel(ARCEncoderConfig(backbone=scaled, rope=rope, decoders=[]))
        assert torch.allclose(model.encoder.rotary_emb.inv_freq, plain) == want_plain, rope


@pytest.mark.distributed
def test_round_trip_import_init_from_zero3_export(tiny_models, tiny_shards, tmp_path):
    """A reference checkpoint at x8 -> import-arc -> 2 ZeRO-3 ranks at x4 with train.init_from=the import and both
    learning rates 0 -> export: the same weights bitwise, and vectors that are the reference's at x4."""
    from helpers import overrides, run
    from safetensors.torch import load_file

    a = backbone_dims(tiny_models / "encoder")
    n_kept = a["n_layers"] - 2
    emb, bridge = reference_weights(a, n_kept, [128, 160], 256)  # the tiny decoders' sizes, tiny_cpu's projector
    write_release(tmp_path / "src", a, emb, bridge, -8, 2, 256, 128)
    imported, exported, run_dir = tmp_path / "imported", tmp_path / "exported", tmp_path / "run"
    arctrain(
        [
            "import-arc",
            str(tmp_path / "src"),
            "--out",
            str(imported),
            "--backbone",
            str(tiny_models / "encoder"),
            "--decoders",
            "llama,mistral",
        ]
    )
    args = overrides(
        tiny_models,
        tiny_shards,
        run_dir,
        "train.steps=2",
        "checkpoint.interval=2",
        f"train.init_from={imported}",
        "optim.encoder_lr=0",
        "optim.projector_lr=0",
        "model.pooling_factor=4",
        "model.rope=plain",
        "decoders.0.rope=plain",
        "decoders.1.rope=plain",
        "logging.sample_keys=false",
    )
    assert run(args, 2, tmp_path / "log") == [0, 0], (tmp_path / "log.rank0").read_text()[-3000:]
    log = (tmp_path / "log.rank0").read_text()
    before = load_file(imported / "model.safetensors")
    assert f"initialised {len(before)} tensors" in log and str(imported) in log, log[-3000:]
    arctrain(["export", "--run", str(run_dir), "--out", str(exported)])

    after = load_file(exported / "model.safetensors")
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    config = json.loads((exported / "config.json").read_text())
    assert config["pooling_factor"] == 4 and config["rope"] == "plain"
    assert [d["rope"] for d in config["decoders"]] == ["plain", "plain"]
    ids, mask, segments = inputs(exported)
    model = AutoModel.from_pretrained(exported, trust_remote_code=True).eval()
    with torch.no_grad():
        for seg, got in zip(segments, model.compress(ids, mask), strict=True):
            assert rel_err(got, reference_compress(emb, a, n_kept, seg, -4)) < 1e-5


def test_init_from_accepts_an_export_and_refuses_other_model_dirs(backbone, tmp_path):
    from arctrain.checkpoint.init_from import initial_weights, source_checkpoint

    a = backbone_dims(backbone)
    emb, bridge = reference_weights(a, a["n_layers"] - 2, [128], 48)
    write_release(tmp_path / "src", a, emb, bridge, -8, 1, 48, 128)
    arctrain(["import-arc", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--backbone", str(backbone)])
    path, state = initial_weights(tmp_path / "out")
    assert path == tmp_path / "out" and "specials.decoder0.rec" in state and "encoder.embed_tokens.weight" in state
    with pytest.raises(ValueError, match=r"config.json: not an arctrain export \(model_type 'llama'"):
        source_checkpoint(backbone)  # a Hugging Face model directory is not an export
    (tmp_path / "out" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: weight file missing from the export"):
        source_checkpoint(tmp_path / "out")
