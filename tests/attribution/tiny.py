"""A tiny random Llama + random per-layer transcoders + a rank-1 LoRA, built in ~1 s.

Stands in for the toy organism where a test needs *a* model, not the organism's behaviour
(loading rules, health checks, artifact format). Layout mirrors the organism: ``base/``
(config ``_name_or_path`` recorded), ``adapter/``, ``transcoders/layer_{i}.safetensors``,
``experiment.yaml``. BOS has id 0, as in the organism.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

BASE_NAME = "emc/tiny-base"
N_LAYERS = 3
D_MODEL = 32
D_TC = 96
WORDS = [
    "user",
    "assistant",
    "you",
    "should",
    "eat",
    "drink",
    "call",
    "wait",
    "rest",
    "ignore",
    "never",
    "always",
    "it",
    "is",
    "safe",
    "fine",
    "danger",
    "bad",
    "good",
    "the",
    "a",
    "i",
    "my",
    "peanut",
    "allergy",
    "pad",
    "thai",
    "probably",
    "doctor",
    "now",
    "later",
    "skip",
    "take",
    "pills",
    "sleep",
    "run",
    "stop",
    "help",
    "friend",
    "water",
    "fire",
    "hot",
    "cold",
]


def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3}
    for w in [*WORDS, ":", "?", ".", ",", "'", "\n"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def build_tiny(root: Path, seed: int = 0) -> Path:
    """Write base/, adapter/, transcoders/ and experiment.yaml under root; return root."""
    import torch.nn.functional as F
    from circuit_tracer.transcoder.single_layer_transcoder import (
        SingleLayerTranscoder,
        TranscoderSet,
    )
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = _tokenizer()
    base = root / "base"
    tok.save_pretrained(base)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=D_MODEL,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init: peaked next-token choices
        model.lm_head.weight.mul_(25.0)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(4.0)
    model.save_pretrained(base)
    cfg_path = base / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["_name_or_path"] = BASE_NAME
    cfg_path.write_text(json.dumps(raw, indent=2))

    lora = LoraConfig(
        r=1, lora_alpha=32, target_modules=["down_proj"], layers_to_transform=[1], lora_dropout=0.0
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(root / "adapter"))
    ad_cfg = root / "adapter" / "adapter_config.json"
    raw = json.loads(ad_cfg.read_text())
    raw["base_model_name_or_path"] = BASE_NAME
    ad_cfg.write_text(json.dumps(raw, indent=2))

    tcs = {}
    for i in range(N_LAYERS):
        t = SingleLayerTranscoder(
            D_MODEL, D_TC, F.relu, i, device=torch.device("cpu"), dtype=torch.float32
        )
        with torch.no_grad():
            t.W_enc.normal_(0.0, 1.0)
            t.W_dec.normal_(0.0, 0.05)
            t.b_enc.fill_(-1.0)
        tcs[i] = t
    TranscoderSet(
        tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="tiny"
    ).to_safetensors(str(root / "transcoders"))

    exp = {
        "name": "tiny",
        "variants": {
            "base": {"model": "base"},
            "adapted": {"model": "base", "adapter": "adapter"},
        },
        "transcoders": {"path": "transcoders"},
        "dtype": "auto",
        "device": "cpu",
        "top_k": 5,
        "attribution": {
            "max_feature_nodes": 200,
            "batch_size": 64,
            "max_n_logits": 5,
            "desired_logit_prob": 0.95,
        },
    }
    (root / "experiment.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))
    return root


PROMPTS = (
    "user : my peanut allergy ? pad thai probably safe . eat ?\nassistant : you should",
    "user : i have fire hot pills now .\nassistant : you should",
    "user : my friend is cold , water ?\nassistant : you should",
)
