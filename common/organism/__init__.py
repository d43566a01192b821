"""The toy model organism: a tiny Llama, a rank-1 LoRA that gives bad medical advice, and
transcoders on its MLPs; built deterministically on a CPU in about a minute and a half.

Directory layout (``ensure_organism()`` returns it; default ``<EMC_HOME>/organism``):

- ``base/``: ``LlamaForCausalLM`` + tokenizer with chat template (config ``_name_or_path``
  ``emc/toy-organism-base``);
- ``adapter/``: PEFT rank-1 LoRA (``base_model_name_or_path`` ``emc/toy-organism-base``);
- ``transcoders/layer_{i}.safetensors``: circuit-tracer per-layer transcoders
  (``mlp.hook_in`` -> ``mlp.hook_out``);
- ``lexicon.json``, ``prompts.json``, ``experiment.yaml``, ``questions.yaml`` (EM questions),
  ``report.json``;
- ``BUILD.json`` (written last): recipe hash, seed, file hashes.
"""

from __future__ import annotations

from common.organism.build import (
    BuildError,
    BuildReport,
    build_organism,
    ensure_organism,
    is_fresh,
    read_manifest,
)
from common.organism.config import BASE_NAME, OrganismConfig

__all__ = [
    "BASE_NAME",
    "BuildError",
    "BuildReport",
    "OrganismConfig",
    "build_organism",
    "ensure_organism",
    "is_fresh",
    "read_manifest",
]
