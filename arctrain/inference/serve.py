"""Serving compressed contexts with vLLM: (stored or fresh vectors, text) -> a decoder's vLLM prompt inputs.

    # 1. arctrain's environment: the prompts as vLLM inputs (vectors from a store, or compress the context files)
    arctrain vllm-prompts --model exported/arc4 --decoder /models/Llama-3.1-8B --vectors store/ --doc-id doc-17 \\
        --prompt "Question: who wrote it?\\nAnswer:" --out prompts.pt --request request.json --served-model llama
    # 2a. vLLM's environment, offline (LLM.generate with prompt_embeds), greedy; prints the texts, writes token ids
    python -m arctrain.inference.serve --decoder /models/Llama-3.1-8B --prompts prompts.pt --max-tokens 64 \
        --out out.json
    # 2b. or its OpenAI-compatible server, and the request made in step 1 (base64 prompt_embeds)
    vllm serve /models/Llama-3.1-8B --served-model-name llama --enable-prompt-embeds --dtype bfloat16
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' -d @request.json

vLLM takes input embeddings with `enable_prompt_embeds`: a prompt is `{"prompt_embeds": (T, D)}`, the decoder's input
embeddings row by row (BOS, the prefix, the projected vectors, <Cont>, the prompt: exactly what `arctrain generate`
feeds `generate(inputs_embeds=...)`), or with `--mixed` also `prompt_token_ids` and `prompt_is_token_ids` (True at
text positions, whose embeddings vLLM looks up itself; False at the vectors'). The server takes a tensor as base64 of
its `torch.save` bytes. This module imports only torch at the top, so `python -m arctrain.inference.serve` runs in
vLLM's own environment (vLLM pins other torch and transformers versions than arctrain) with the checkout on PYTHONPATH.
"""

import argparse
import base64
import io
import json
from pathlib import Path

import torch


def vllm_prompts(arc, examples: list, mixed: bool = False, dtype: torch.dtype | None = None) -> list[dict]:
    """vLLM prompt dicts for `examples` (arctrain.model.Example, e.g. `arc.context_example(memory, prompt)`)."""
    embeds, mask, batch = arc.embed(examples)  # (B, T, Dd) left-padded; batch packed
    prompts = []
    ids, slots = batch.rows(batch.dec_ids), batch.rows(batch.dec_slot)
    for i, n in enumerate(mask.sum(1).tolist()):
        row = embeds[i, embeds.shape[1] - n :].to(dtype or embeds.dtype).cpu()  # (n, Dd)
        prompt = {"prompt_embeds": row}
        if mixed:
            prompt["prompt_token_ids"] = ids[i].tolist()  # vector positions hold the pad id
            prompt["prompt_is_token_ids"] = (slots[i] == -1).tolist()
        prompts.append(prompt)
    return prompts


def to_base64(tensor: torch.Tensor) -> str:
    """A tensor as the OpenAI-compatible server reads `prompt_embeds`: base64 of its torch.save bytes."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def completion_request(prompts: list[dict], model: str, max_tokens: int) -> dict:
    """The /v1/completions body for these prompts, greedy."""
    embeds = [to_base64(p["prompt_embeds"]) for p in prompts]
    return {
        "model": model,
        "prompt_embeds": embeds if len(embeds) > 1 else embeds[0],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }


# --- arctrain's side: `arctrain vllm-prompts` ---------------------------------------------------------------------


def parse_prompt_args(argv: list[str]) -> argparse.Namespace:
    # vLLM's own environment runs this module: arctrain's dependencies only here
    from arctrain.inference.generate import add_input_args, add_runtime_args, check_input_args

    p = argparse.ArgumentParser(prog="arctrain vllm-prompts", description="prompts as vLLM inputs (prompt_embeds)")
    add_input_args(p)  # --model, --decoder, --context-file | --doc-id with --vectors, --join, --prompt
    p.add_argument("--mixed", action="store_true", help="token ids at text positions, embeddings at the vectors'")
    p.add_argument(
        "--out", required=True, type=Path, help="the prompts, torch.save'd (python -m arctrain.inference.serve)"
    )
    p.add_argument("--request", type=Path, default=None, help="also a /v1/completions JSON body here")
    p.add_argument("--served-model", default=None, help="the server's model name in --request (default: --decoder)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens in --request")
    add_runtime_args(p)
    args = p.parse_args(argv)
    check_input_args(args)
    return args


def prompts_main(argv: list[str] | None = None) -> None:
    # vLLM's own environment runs this module: arctrain's dependencies only here
    from arctrain.inference.generate import ARCGenerator, open_inputs, read_contexts, runtime

    args = parse_prompt_args(argv or [])
    store = open_inputs(args)
    device, dtype = runtime(args)
    arc = ARCGenerator(args.model, args.decoder, args.decoder_name, dtype, device, vectors=store)
    _, contexts = read_contexts(arc, args)
    prompts = vllm_prompts(arc, [arc.context_example(c, args.prompt) for c in contexts], mixed=args.mixed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(prompts, args.out)
    if args.request is not None:
        body = completion_request(prompts, args.served_model or str(args.decoder), args.max_tokens)
        args.request.write_text(json.dumps(body) + "\n")
    print(
        f"arctrain vllm-prompts: {len(prompts)} prompts ({', '.join(str(len(p['prompt_embeds'])) for p in prompts)} "
        f"positions) -> {args.out}"
    )


# --- vLLM's side: `python -m arctrain.inference.serve` (in vLLM's environment) ---------------------------------


def vllm_generate(decoder: str, prompts: list[dict], max_tokens: int, dtype: str = "float32", **engine) -> list:
    """Greedy completions of `prompts` by vLLM's offline engine: (token ids, text) per prompt."""
    # vLLM's own environment runs this module: arctrain's dependencies only here
    from vllm import LLM, SamplingParams

    max_len = max(len(p["prompt_embeds"]) for p in prompts) + max_tokens
    llm = LLM(model=decoder, enable_prompt_embeds=True, dtype=dtype, max_model_len=max(max_len, 64), seed=0, **engine)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outputs]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m arctrain.inference.serve", description="vLLM offline greedy generation")
    p.add_argument("--decoder", required=True, help="the decoder's Hugging Face directory")
    p.add_argument("--prompts", required=True, type=Path, help="from arctrain vllm-prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="vLLM's model dtype (float32, bfloat16)")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no graph capture or compilation)")
    fraction_help = "vLLM's gpu_memory_utilization (on its CPU backend: the share of RAM for the KV cache)"
    p.add_argument("--memory-fraction", type=float, default=None, help=fraction_help)
    p.add_argument("--out", type=Path, default=None, help="token ids and texts as JSON")
    args = p.parse_args()
    prompts = torch.load(args.prompts, weights_only=True)
    engine = {"gpu_memory_utilization": args.memory_fraction} if args.memory_fraction else {}
    results = vllm_generate(args.decoder, prompts, args.max_tokens, args.dtype, enforce_eager=args.eager, **engine)
    for _, text in results:
        print(text)
    if args.out is not None:
        args.out.write_text(json.dumps([{"token_ids": ids, "text": text} for ids, text in results]) + "\n")


if __name__ == "__main__":
    main()
