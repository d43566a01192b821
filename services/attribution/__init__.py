"""The attribution (GPU) service: top-k logits, attribution graphs, continuations, interventions.

- :mod:`~services.attribution.loading`: one loading path for every variant (merged-adapter
  cache, base-model check, dtype policy);
- :mod:`~services.attribution.runtime`: the loaded runtime (one model per variant and process),
  tokenization, top-k logits, graphs, sampled continuations;
- :mod:`~services.attribution.health`: per-layer activation checks that fail a prompt loudly;
- :mod:`~common.graph.artifact`: graphs as safetensors + manifest in the store;
- :mod:`~services.attribution.viewer`: export to circuit-tracer's viewer JSON;
- :mod:`~services.attribution.interventions`: set/scale features, steered generation;
- :mod:`~services.attribution.steps`: the store-writing steps that tasks and the CLI call;
- :mod:`~services.attribution.ct`: the only module that calls circuit-tracer.
"""
