"""Export a stored graph to circuit-tracer's viewer JSON (``{slug}.json`` + ``graph-metadata.json``).

Offline: the tokenizer and model config come from the variant's local model directory. The
stored artifact is turned back into a circuit-tracer ``Graph`` (every stored feature counts as
selected) and pruned with circuit-tracer's own ``prune_graph`` before writing. Graphs loaded
from the store lack the weakest feature edges, which the viewer's pruning would drop anyway,
and their logit rows include what those edges carried (see
:mod:`common.graph.artifact`). Error-node ids follow upstream's fix of issue 78
(see :func:`services.attribution.ct.write_viewer_files`).

Serve the folder with circuit-tracer's local server bound to 127.0.0.1 only: its ``serve()``
listens on every interface without authentication.
"""

from __future__ import annotations

from pathlib import Path

from common.experiment import Experiment
from common.graph.artifact import load_graph
from common.graph.model import AttributionGraph
from common.store import ObjectStore
from services.attribution import ct


def to_circuit_tracer(graph: AttributionGraph, model_dir: str):  # type: ignore[no-untyped-def]
    """A circuit-tracer ``Graph`` equivalent to ``graph`` (config read from ``model_dir``)."""
    m = graph.manifest
    cfg = ct.unified_config(model_dir, m.n_layers)
    return ct.make_graph(
        input_ids=m.input_ids,
        input_string=m.prompt_text,
        features=graph.features,
        activations=graph.activations,
        adjacency=graph.adjacency,
        logit_token_ids=m.logit_token_ids,
        logit_tokens=m.logit_tokens,
        logit_probabilities=m.logit_probabilities,
        cfg=cfg,
        vocab_size=int(cfg.d_vocab),
        scan=m.scan,
    )


def export_viewer(
    graph: AttributionGraph,
    model_dir: str,
    out_dir: Path,
    *,
    slug: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Path:
    """Write the viewer files of one graph into ``out_dir``; returns the graph JSON's path."""
    from transformers import AutoTokenizer

    m = graph.manifest
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return ct.write_viewer_files(
        to_circuit_tracer(graph, model_dir),
        tokenizer,
        Path(out_dir),
        slug=slug or f"{m.prompt_id}-{m.variant}",
        scan=m.scan or "emc",
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )


def export_stored(
    store: ObjectStore,
    exp: Experiment,
    pid: str,
    variant: str,
    out_dir: Path,
    *,
    fingerprint: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Path:
    """Load (prompt, variant)'s graph from the store and export it (tokenizer: the variant's
    base model directory, which the merged model shares)."""
    if variant not in exp.variants:
        raise KeyError(f"variant {variant!r} is not in experiment {exp.name!r}")
    graph = load_graph(store, exp.name, pid, fingerprint or exp.fingerprint, variant)
    return export_viewer(
        graph,
        exp.variants[variant].model,
        out_dir,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
