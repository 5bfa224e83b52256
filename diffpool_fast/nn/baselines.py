"""Baselines built from PyTorch Geometric's own modules, for speed and accuracy comparisons.

:class:`PyGDiffPoolNet` is the architecture of PyG's DiffPool example
(``examples/proteins_diff_pool.py`` in pyg-team/pytorch_geometric): per GNN block three
``DenseSAGEConv`` layers, each followed by ReLU and ``BatchNorm1d`` over all B*N rows (padding
included), outputs concatenated; two ``torch_geometric.nn.dense_diff_pool`` levels with
C_1 = ceil(0.25 * max_nodes), C_2 = ceil(0.25 * C_1); a third embedding block, mean readout,
``Linear(3h, h) -> ReLU -> Linear(h, classes)``. Written here from that description;
torch_geometric is imported when the class is instantiated, not with this module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PyGDiffPoolNet"]


class _PyGBlock(nn.Module):
    def __init__(self, in_channels, hidden, out_channels, lin):
        super().__init__()
        from torch_geometric.nn import DenseSAGEConv

        widths = [in_channels, hidden, hidden, out_channels]
        self.convs = nn.ModuleList(DenseSAGEConv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(b) for b in widths[1:])
        self.lin = nn.Linear(2 * hidden + out_channels, out_channels) if lin else None

    def forward(self, x, adj, mask=None):
        outs = []
        for conv, bn in zip(self.convs, self.bns):
            x = conv(x, adj, mask).relu()
            B, N, C = x.shape
            x = bn(x.reshape(B * N, C)).reshape(B, N, C)
            outs.append(x)
        x = torch.cat(outs, dim=-1)
        if self.lin is not None:
            x = self.lin(x).relu()
        return x


class PyGDiffPoolNet(nn.Module):
    """PyG's DiffPool example network.

    Args:
        in_channels: node input features. num_classes: classes.
        max_nodes: the padded node count (150 in the example); clusters derive from it.
        hidden: width (64 in the example).

    ``forward(x, adj, mask=None)`` returns ``(log_probs [B, classes], link_loss, ent_loss)`` as
    the example does (the example's training loss then ignores the two auxiliary losses).
    ``adj`` must be floating point (PyG's layers multiply it directly).
    """

    def __init__(self, in_channels: int, num_classes: int, max_nodes: int = 150, hidden: int = 64):
        super().__init__()
        c1 = math.ceil(0.25 * max_nodes)
        c2 = math.ceil(0.25 * c1)
        self.clusters = [c1, c2]
        self.gnn1_pool = _PyGBlock(in_channels, hidden, c1, lin=True)
        self.gnn1_embed = _PyGBlock(in_channels, hidden, hidden, lin=False)
        self.gnn2_pool = _PyGBlock(3 * hidden, hidden, c2, lin=True)
        self.gnn2_embed = _PyGBlock(3 * hidden, hidden, hidden, lin=False)
        self.gnn3_embed = _PyGBlock(3 * hidden, hidden, hidden, lin=False)
        self.lin1 = nn.Linear(3 * hidden, hidden)
        self.lin2 = nn.Linear(hidden, num_classes)

    def forward(self, x, adj, mask=None):
        from torch_geometric.nn import dense_diff_pool

        s = self.gnn1_pool(x, adj, mask)
        x = self.gnn1_embed(x, adj, mask)
        x, adj, l1, e1 = dense_diff_pool(x, adj, s, mask)
        s = self.gnn2_pool(x, adj)
        x = self.gnn2_embed(x, adj)
        x, adj, l2, e2 = dense_diff_pool(x, adj, s)
        x = self.gnn3_embed(x, adj)
        x = self.lin1(x.mean(dim=1)).relu()
        return F.log_softmax(self.lin2(x), dim=-1), l1 + l2, e1 + e2
