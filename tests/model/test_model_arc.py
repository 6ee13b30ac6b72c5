"""The ARC model (arctrain/model/arc.py, build.py) on the tiny real models: insertion, losses, what trains.

Its helpers (configs, corpus_texts, make_batch) are in helpers.py, shared with the other test_model_* modules."""

import pytest
import torch
import torch.nn.functional as F
from helpers import DECODERS, configs, corpus_texts, make_batch, tokenizer

from arctrain.model import ARCModel, build_model


@pytest.fixture(scope="module")
def built(tiny_models):
    model_cfg, decoder_cfgs = configs(tiny_models)
    torch.manual_seed(0)
    return model_cfg, build_model(model_cfg, decoder_cfgs)


@pytest.fixture(scope="module")
def texts(tiny_models):
    return corpus_texts(tiny_models, heldout=False, limit=4)


def manual_embeds(model: ARCModel, batch, decoder: str) -> list[torch.Tensor]:
    """Decoder inputs of each row, built position by position from the token table, the pooled vectors (each
    segment compressed alone) and the projector."""
    vectors = torch.cat(
        [model.encoder.compress_segments([seg])[0] for seg in batch.segments()]
        + [model.specials[decoder].rec[None], model.specials[decoder].cont[None]]
    )
    first, second = model.projectors[decoder]
    projected = vectors @ first.weight.T @ second.weight.T  # (N + 2, Dd)
    table = model.decoders[decoder].get_input_embeddings().weight
    rows = [
        [projected[s] if s >= 0 else table[t] for t, s in zip(ids.tolist(), slots.tolist(), strict=True)]
        for ids, slots in zip(batch.rows(batch.dec_ids), batch.rows(batch.dec_slot), strict=True)
    ]
    return [torch.stack(r) for r in rows]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("task", ["reconstruction", "continuation"])
def test_loss_equals_manual_computation_from_inputs_embeds(built, tiny_models, texts, decoder, task):
    model_cfg, model = built
    batch = make_batch(tiny_models, model_cfg, decoder, task, texts)
    with torch.no_grad():
        out = model(batch, decoder)
        rows = manual_embeds(model, batch, decoder)
        torch.testing.assert_close(model.embed(batch, decoder)[0], torch.cat(rows))
        logits = [model.decoders[decoder](inputs_embeds=row[None]).logits[0] for row in rows]  # (n, V) each, alone
    targets = [labels[1:] for labels in batch.rows(batch.labels)]
    expected = F.cross_entropy(torch.cat([lg[:-1] for lg in logits]), torch.cat(targets), ignore_index=-100)
    assert out.n_tokens == sum(int((t != -100).sum()) for t in targets) > 0
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_two_decoders_with_different_sizes_and_vocabularies(built, tiny_models, texts):
    model_cfg, model = built
    sizes = {name: (d.config.hidden_size, d.config.vocab_size) for name, d in model.decoders.items()}
    assert sizes["llama"] != sizes["mistral"] and sizes["llama"][1] != sizes["mistral"][1]
    for name, (hidden, _) in sizes.items():
        assert model.projectors[name][1].out_features == hidden
        assert model.projectors[name][0].in_features == model.encoder.hidden_size
        assert model.projectors[name][0].bias is None and model.projectors[name][1].bias is None
        torch.testing.assert_close(model.specials[name].rec.detach(), torch.ones(model.encoder.hidden_size))
    with torch.no_grad():
        losses = {d: model(make_batch(tiny_models, model_cfg, d, "continuation", texts), d).loss for d in sizes}
    assert all(torch.isfinite(v) for v in losses.values())


def test_use_context_false_is_the_plain_decoder_loss(built, tiny_models, texts):
    model_cfg, model = built
    batch = make_batch(tiny_models, model_cfg, "llama", "reconstruction", texts[:1])
    dec_tok = tokenizer(str(tiny_models / "llama"))
    ids = torch.tensor([[dec_tok.bos_token_id] + dec_tok(texts[0], add_special_tokens=False).input_ids])
    labels = ids.clone()
    labels[0, 0] = -100
    with torch.no_grad():
        plain = model.decoders["llama"](input_ids=ids, labels=labels).loss
        out = model(batch, "llama", use_context=False)
    assert out.n_tokens == ids.shape[1] - 1
    torch.testing.assert_close(out.loss, plain)


def _trainable_names(model: ARCModel) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.split(".")[0] in ("encoder", "projectors", "specials")}


def test_optimizer_step_trains_encoder_projectors_specials_only(tiny_models, texts):
    model_cfg, decoder_cfgs = configs(tiny_models)
    torch.manual_seed(0)
    model = build_model(model_cfg, decoder_cfgs).train()
    frozen = {k: v.clone() for k, v in model.decoders.state_dict().items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for decoder, task in [("llama", "reconstruction"), ("mistral", "continuation")]:
        model(make_batch(tiny_models, model_cfg, decoder, task, texts), decoder).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == _trainable_names(model)
    assert not any(p.requires_grad for p in model.decoders.parameters())
    optimizer.step()
    for k, v in model.decoders.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == _trainable_names(model)
    assert model.encoder.training and not any(m.training for d in model.decoders.values() for m in d.modules())


def test_every_task_touches_the_same_parameters(built, tiny_models, texts):
    """ZeRO-3 needs the same modules on every rank: a reconstruction and a continuation batch use the same set."""
    model_cfg, model = built
    touched = []
    for task in ("reconstruction", "continuation"):
        model.zero_grad(set_to_none=True)
        model(make_batch(tiny_models, model_cfg, "llama", task, texts), "llama").loss.backward()
        touched.append({n for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert touched[0] == touched[1]
    assert {"specials.llama.rec", "specials.llama.cont"} <= touched[0]


def test_decoder_checkpointing_gives_the_same_gradients(tiny_models, texts):
    model_cfg, decoder_cfgs = configs(tiny_models, decoders=("llama",))
    torch.manual_seed(0)
    model = build_model(model_cfg, decoder_cfgs).train()
    batch = make_batch(tiny_models, model_cfg, "llama", "continuation", texts)
    grads = []
    for step in range(2):
        if step == 1:
            model.enable_decoder_checkpointing()
            model.encoder.gradient_checkpointing = True
        model.zero_grad(set_to_none=True)
        model(batch, "llama").loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    layer = model.decoders["llama"].model.layers[0]
    assert layer.gradient_checkpointing and layer.training and not layer.self_attn.training
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_bfloat16_model(tiny_models, texts):
    model_cfg, decoder_cfgs = configs(tiny_models, decoders=("mistral",))
    model = build_model(model_cfg, decoder_cfgs, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(make_batch(tiny_models, model_cfg, "mistral", "reconstruction", texts), "mistral")
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.projectors["mistral"][0].weight.grad.dtype == torch.bfloat16


def test_build_model_rejects_bad_input(tiny_models, tmp_path):
    model_cfg, decoder_cfgs = configs(tiny_models)
    with pytest.raises(ValueError, match="must be unique"):
        build_model(model_cfg, decoder_cfgs + decoder_cfgs[:1])
    decoder_cfgs[0].path = str(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}: not a Hugging Face model directory"):
        build_model(model_cfg, decoder_cfgs)


def test_forward_and_backward_read_nothing_back_from_the_device(tiny_models):
    """On the meta device any `.item()`, `.tolist()`, `int(t)` or boolean-mask index raises: the encoder, the
    insertion of the vectors, the decoder (packed attention: no mask is created, PyTorch's varlen kernel infers
    shapes there) and the chunked loss run there, forward and backward, so they never wait for the device (collate
    computed every size on the CPU)."""
    model_cfg, decoder_cfgs = configs(tiny_models)
    model = build_model(model_cfg, decoder_cfgs).train()
    batch = make_batch(tiny_models, model_cfg, "llama", "reconstruction", corpus_texts(tiny_models, heldout=False))
    model.to("meta")
    batch = batch.to("meta")
    embeds = model.embed(batch, "llama")  # (1, N_dec, Dd)
    assert embeds.shape == (*batch.dec_ids.shape, model.decoders["llama"].config.hidden_size)
    out = model(batch, "llama")
    assert out.loss.device.type == "meta"
    out.loss.backward()
    assert model.projectors["llama"][0].weight.grad.device.type == "meta"
    assert model.encoder.layers[0].self_attn.q_proj.weight.grad.device.type == "meta"


@pytest.mark.parametrize(("encoder_on", "decoder_on"), [(True, False), (False, True), (True, True), (False, False)])
def test_encoder_and_decoder_checkpointing_are_separate_switches(tiny_models, texts, encoder_on, decoder_on):
    """train.encoder_checkpointing / train.decoder_checkpointing: a checkpointed layer runs twice per step (forward,
    and again in backward), another once."""
    from arctrain.config.deepspeed import REPO_ROOT
    from arctrain.config.load import load_config
    from arctrain.train.loop import build_arc_model

    paths = [
        f"model.encoder_path={tiny_models / 'encoder'}",
        f"decoders.0.path={tiny_models / 'llama'}",
        f"decoders.1.path={tiny_models / 'mistral'}",
    ]
    switches = [f"train.encoder_checkpointing={encoder_on}", f"train.decoder_checkpointing={decoder_on}"]
    cfg = load_config(REPO_ROOT / "configs/tiny_cpu.yaml", paths + switches)
    model = build_arc_model(cfg, torch.float32, None).train()
    calls = {"encoder": 0, "decoder": 0}
    # On the layer's first op (transformers checkpoints a layer's forward, inside its hooks), before it runs: a
    # recomputation stops as soon as it has what backward needs.
    for part, layer in (("encoder", model.encoder.layers[0]), ("decoder", model.decoders["llama"].model.layers[0])):
        layer.input_layernorm.register_forward_pre_hook(lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))
    model(make_batch(tiny_models, cfg.model, "llama", "reconstruction", texts[:4]), "llama").loss.backward()
    assert calls == {"encoder": 1 + encoder_on, "decoder": 1 + decoder_on}


def test_the_earlier_single_switch_turns_on_both():
    from arctrain.config.deepspeed import REPO_ROOT
    from arctrain.config.load import load_config

    cfg = load_config(REPO_ROOT / "configs/tiny_cpu.yaml", ["train.activation_checkpointing=true"])
    assert cfg.train.encoder_checkpointing and cfg.train.decoder_checkpointing
    assert cfg.train.activation_checkpointing is None  # normalised: a saved config.yaml says it with the two keys
    with pytest.raises(ValueError, match="train.decoder_checkpointing"):
        load_config(REPO_ROOT / "configs/tiny_cpu.yaml", ["train.decoder_checkpointing=sometimes"])
