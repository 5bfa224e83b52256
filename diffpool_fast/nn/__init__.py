"""Layers and models: dense GNN layers, the SAGE blocks with a hand-written backward, the
DiffPool level and classifier, and PyG's example network as a baseline."""
from .layers import DenseGCN, DenseGIN, DenseSAGE, MaskedBatchNorm
from .model import DenseGNN, DiffPool, DiffPoolClassifier, DiffPoolOutput, cluster_counts

__all__ = ["DenseGCN", "DenseGIN", "DenseSAGE", "MaskedBatchNorm", "DenseGNN", "DiffPool",
           "DiffPoolClassifier", "DiffPoolOutput", "cluster_counts"]
