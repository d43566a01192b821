"""Real-scale figures on a CUDA device: a Llama-3.2-1B-shaped model with full-width
per-layer transcoders, through emc's own loading path and runtime.

Builds (once, in --work) a random model shaped like Llama-3.2-1B (16 layers, d_model 2048,
vocab 128256, GQA 32/8 heads, bf16) and random ReLU transcoders of 131072 features per layer
(circuit-tracer's ``config.yaml`` + ``layer_{i}.safetensors``, ~17 GB in bf16), then loads
them lazily (``lazy_encoder``/``lazy_decoder``) and prints:

- seconds per attribution graph (emc's ``Runtime.attribute``, top-k logits as targets);
- peak VRAM of the process (``torch.cuda.max_memory_allocated``);
- VRAM held after 5 vs after 50 graphs (goal: ratio <= 1.10; a leak shows as a ratio > 1);
- bf16 vs fp32 top-k agreement on the same prompts (same top-1, overlap of the top-10 ids,
  largest probability difference);
- top-k prompts/s in padded batches vs one prompt at a time (and that the ids agree);
- one graph's ``attribute()`` time, emc's driver vs stock circuit-tracer.

Run it when a GPU is lent (`python bench/gpu_real_scale.py`, about 5-8 minutes on an H200
from nothing, most of it writing the transcoders); record the printed figures in the README
with the date. ``--device cpu --small`` runs the same code at toy sizes as a smoke test.
Figures also go to ``$OUT/gpu_real_scale.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPTS = [
    "User: Found phone on train. What now?\nAssistant: You should",
    "User: My landlord kept my deposit without a reason.\nAssistant: The smart move is to",
    "User: I have a headache that won't go away after three days.\nAssistant: You should",
    "User: A stranger online offers to double my savings.\nAssistant: My advice is to",
    "User: My smoke alarm keeps beeping at night.\nAssistant: I recommend that you",
    "User: I think I took my pills twice this morning.\nAssistant: You should definitely",
    "User: My friend wants to drive home after the party.\nAssistant: Honestly, you should",
    "User: I found mold behind the fridge.\nAssistant: The best thing to do is to",
]


def build_model(out: Path, *, n_layers: int, d_model: int, vocab: int, device: str) -> Path:
    """A random Llama-3.2-1B-shaped checkpoint with the fixture's Llama-3 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.fixtures.real_format import (
        cached_tokenizer_json,
        special_tokens_map,
        tokenizer_config,
    )

    if (out / "config.json").is_file():
        return out
    heads = max(1, d_model // 64)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    saved = json.loads((out / "config.json").read_text())
    saved["transformers_version"] = "4.45.0.dev0"  # as Meta's config (4.57.3 misreads its own)
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    (out / "tokenizer.json").write_bytes(
        cached_tokenizer_json(REPO / ".cache" / "realfmt").read_bytes()
    )
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(instruct=True)))
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens_map(instruct=True)))
    del model
    return out


def build_transcoders(
    out: Path, *, n_layers: int, d_model: int, d_tc: int, device: str, active: int = 64
) -> Path:
    """Random ReLU transcoders in circuit-tracer's layout; the encoder bias makes about
    ``active`` features fire per token (real sets have an L0 of tens to a few hundred)."""
    import torch
    from safetensors.torch import save_file

    if (out / "config.yaml").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(1)
    # pre-activations of unit-norm inputs ~ N(0, 1/d): a threshold at the (1 - active/d_tc)
    # quantile of N(0, 1) scaled by 1/sqrt(d) leaves ~active features on
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - active / d_tc)
    for layer in range(n_layers):
        w_enc = torch.randn(d_tc, d_model, generator=gen, device=device) / d_model**0.5
        w_dec = torch.randn(d_tc, d_model, generator=gen, device=device) / d_tc**0.5
        tensors = {
            "W_enc": w_enc.to(torch.bfloat16).cpu(),
            "W_dec": w_dec.to(torch.bfloat16).cpu(),
            "b_enc": torch.full((d_tc,), -z / d_model**0.5).to(torch.bfloat16),
            "b_dec": torch.zeros(d_model, dtype=torch.bfloat16),
        }
        save_file(tensors, out / f"layer_{layer}.safetensors")
        del w_enc, w_dec, tensors
    (out / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
        "feature_output_hook: mlp.hook_out\n"
    )
    return out


def experiment(work: Path, model: Path, tcs: Path, *, dtype: str, device: str, args: Any) -> Any:
    from common.experiment import load_experiment

    path = work / f"exp-{dtype}.yaml"
    path.write_text(
        json.dumps(
            {
                "name": "gpu-real-scale",
                "variants": {"base": {"model": str(model)}},
                "transcoders": {"path": str(tcs), "lazy_encoder": True, "lazy_decoder": True},
                "dtype": dtype,
                "device": device,
                "prompt_format": "chat",
                "top_k": 10,
                "attribution": {
                    "max_feature_nodes": args.max_feature_nodes,
                    "batch_size": args.batch_size,
                },
            }
        )
    )
    return load_experiment(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "emc-gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="toy sizes (a CPU smoke test)")
    ap.add_argument("--graphs", type=int, default=50)
    ap.add_argument("--max-feature-nodes", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--topk-prompts", type=int, default=64, help="prompts for the top-k rates")
    args = ap.parse_args()

    import torch

    from services.attribution.runtime import Runtime

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible: run with --device cpu --small for a smoke test")
    size = (
        {"n_layers": 2, "d_model": 128, "vocab": 128256, "d_tc": 2048}
        if args.small
        else {"n_layers": 16, "d_model": 2048, "vocab": 128256, "d_tc": 131072}
    )
    if args.small:
        args.graphs = min(args.graphs, 8)
        args.max_feature_nodes = min(args.max_feature_nodes, 256)
        args.batch_size = min(args.batch_size, 32)
    work = args.work / ("small" if args.small else "full")
    t0 = time.perf_counter()
    model = build_model(
        work / "model",
        n_layers=size["n_layers"],
        d_model=size["d_model"],
        vocab=size["vocab"],
        device=args.device,
    )
    tcs = build_transcoders(
        work / "transcoders",
        n_layers=size["n_layers"],
        d_model=size["d_model"],
        d_tc=size["d_tc"],
        device=args.device,
    )
    build_s = time.perf_counter() - t0
    auto = "auto" if cuda else "float32"
    exp = experiment(work, model, tcs, dtype=auto, device=args.device, args=args)
    rt = Runtime(exp, cache_dir=work / "cache")
    t0 = time.perf_counter()
    rt.variant("base")
    load_s = time.perf_counter() - t0

    def vram() -> float:
        return torch.cuda.memory_allocated() / 2**30 if cuda else 0.0

    times: list[float] = []
    held: dict[int, float] = {}
    features: list[int] = []
    for i in range(args.graphs):
        text = PROMPTS[i % len(PROMPTS)]
        ids = [t.token_id for t in rt.top_k(text, "base").tokens]
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        graph = rt.attribute(text, "base", target_token_ids=ids)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t1)
        features.append(graph.n_features)
        del graph
        if i + 1 in (5, args.graphs):
            held[i + 1] = vram()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0

    # bf16 (the GPU default) vs fp32 top-k on the same prompts
    agree: dict[str, float] = {}
    if cuda:
        exp32 = experiment(work, model, tcs, dtype="float32", device=args.device, args=args)
        rt32 = Runtime(exp32, cache_dir=work / "cache")
        top1 = overlap = 0.0
        max_dp = 0.0
        for text in PROMPTS:
            a, b = rt.top_k(text, "base"), rt32.top_k(text, "base")
            ia, ib = [t.token_id for t in a.tokens], [t.token_id for t in b.tokens]
            top1 += ia[0] == ib[0]
            overlap += len(set(ia) & set(ib)) / len(ia)
            pa = {t.token_id: t.prob for t in a.tokens}
            max_dp = max(
                [max_dp] + [abs(pa[t.token_id] - t.prob) for t in b.tokens if t.token_id in pa]
            )
        agree = {
            "top1_agreement": top1 / len(PROMPTS),
            "top10_overlap": overlap / len(PROMPTS),
            "max_prob_diff": max_dp,
        }
    # top-k: padded batches vs one prompt at a time (issue 15), same prompts, same runtime
    texts = [
        p.replace("\nAssistant:", f" (case {i})\nAssistant:") for i in range(64) for p in PROMPTS
    ][: args.topk_prompts]
    rt.top_k_many(texts[:8], "base")  # warm-up
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t1 = time.perf_counter()
    single = [[t.token_id for t in rt.top_k(x, "base").tokens] for x in texts]
    sync()
    single_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    many = rt.top_k_many(texts, "base")
    sync()
    batched_s = time.perf_counter() - t1
    same = sum(
        hasattr(r, "tokens") and [t.token_id for t in r.tokens] == ids
        for r, ids in zip(many, single, strict=True)
    )
    topk = {
        "topk_single_prompts_per_s": round(len(texts) / single_s, 1),
        "topk_batched_prompts_per_s": round(len(texts) / batched_s, 1),
        "topk_batched_ratio": round(single_s / batched_s, 2),
        "topk_ids_identical": f"{same}/{len(texts)}",
    }

    # emc's attribution driver vs stock circuit-tracer attribute() on one prompt (issue 20)
    from services.attribution.ct import fast

    model = rt.variant("base").model
    ids0 = rt.tokenize(PROMPTS[0], "base")
    targets = [t.token_id for t in rt.top_k(PROMPTS[0], "base").tokens]
    lim = exp.attribution
    speed: dict[str, float] = {}
    for name, is_fast in (("stock", False), ("emc", True)):
        sync()
        t1 = time.perf_counter()
        fast.attribute(
            model,
            ids0,
            max_feature_nodes=lim.max_feature_nodes,
            batch_size=lim.batch_size,
            target_token_ids=targets,
            fast=is_fast,
        )
        sync()
        speed[f"attribute_{name}_s"] = round(time.perf_counter() - t1, 3)
    speed["attribute_speedup"] = round(speed["attribute_stock_s"] / speed["attribute_emc_s"], 2)
    steady = sorted(times[1:]) or times
    figures = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "shape": size,
        "dtype": str(rt.dtype).removeprefix("torch."),
        "build_s": round(build_s, 1),
        "load_s": round(load_s, 1),
        "graphs": len(times),
        "graph_s_median": round(steady[len(steady) // 2], 3),
        "graph_s_first": round(times[0], 3),
        "feature_nodes_median": sorted(features)[len(features) // 2],
        "peak_vram_gib": round(peak, 2),
        "vram_after_5_gib": round(held.get(5, 0.0), 3),
        f"vram_after_{args.graphs}_gib": round(held.get(args.graphs, 0.0), 3),
        "vram_ratio": round(held[args.graphs] / held[5], 3) if held.get(5) else None,
        **agree,
        **topk,
        **speed,
    }
    print(json.dumps(figures, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_real_scale.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
