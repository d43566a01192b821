"""In-memory attribution graph shared by the attribution (writer) and analysis (reader) services.

Node order of ``adjacency`` (rows = targets, columns = sources), as in circuit-tracer:
``[features F][errors n_layers*n_pos, layer-major][tokens n_pos][logits K]``.
The stored form is a safetensors file + a :class:`~common.records.GraphManifest` JSON
(see :mod:`common.graph.artifact`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.records import FeatureNode, GraphManifest


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite, in one reduction on the usual path: a sum is
    finite only if every term is (an overflowing sum falls back to the exact check)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


@dataclass
class AttributionGraph:
    """One attribution graph: the manifest, the adjacency over all nodes in the module's node order,
    and the layer, position, id and activation of each feature node."""

    manifest: GraphManifest
    adjacency: torch.Tensor  # [N, N] float32, rows = targets, columns = sources
    features: torch.Tensor  # [F, 3] int64: (layer, pos, feature id) of each feature node
    activations: torch.Tensor  # [F] activation value of each feature node

    @property
    def n_features(self) -> int:
        """Number of active feature nodes (F)."""
        return int(self.features.shape[0])

    @property
    def n_errors(self) -> int:
        """Number of error nodes, one per layer and position."""
        return self.manifest.n_layers * self.manifest.n_pos

    @property
    def n_nodes(self) -> int:
        """Number of nodes of every kind (rows of ``adjacency``)."""
        return int(self.adjacency.shape[0])

    @property
    def feature_slice(self) -> slice:
        """Indices of the feature nodes, first in the node order."""
        return slice(0, self.n_features)

    @property
    def error_slice(self) -> slice:
        """Indices of the error nodes (layer-major), after the features."""
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def token_slice(self) -> slice:
        """Indices of the input-token nodes, after the errors."""
        start = self.n_features + self.n_errors
        return slice(start, start + self.manifest.n_pos)

    @property
    def logit_slice(self) -> slice:
        """Indices of the logit nodes, the last ``n_logits`` of the node order."""
        return slice(self.n_nodes - self.manifest.n_logits, self.n_nodes)

    def feature_node(self, i: int) -> FeatureNode:
        """Layer, position and transcoder feature id of feature node ``i``."""
        layer, pos, feat = (int(x) for x in self.features[i].tolist())
        return FeatureNode(layer=layer, pos=pos, feature=feat)
