"""SNAIL (Mishra et al. 2018): a simple neural attentive meta-learner. The episode is one sequence of
(embedding, one-hot label) pairs, support first and the query last with an all-zero label, read by temporal
convolutions (dense blocks of dilated causal convolutions) interleaved with causal soft attention; the output
at the query's step is its class logits.

Omniglot architecture (paper, appendix): attention(64, 32), TC(T, 128), attention(256, 128), TC(T, 128),
attention(512, 256), then a 1x1 convolution (here: a linear layer per step) to N logits; T = N*K + 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fsltool.methods.base import option_error, register_method, require_positive_int
from fsltool.methods.sequence import SequenceMethod
from fsltool.models.backbones import Backbone


class CausalLayer(nn.Module):
    """A layer over sequences (E, T, C) -> (E, T, C + added) in which step t sees steps <= t only.

    ``extend`` computes the output at one more step appended after a prefix, for many candidate steps at once:
    (E, S, C) prefix inputs, (E, Q, C) inputs at step S -> (E, Q, C + added), each candidate as if it alone
    followed the prefix. This is how the queries share the support set's computation without seeing each other.
    """

    added: int

    def extend(self, prefix: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DenseLayer(CausalLayer):
    """One dense-block layer: a causal convolution of kernel 2 and this dilation with 2*filters outputs,
    tanh(xf) * sigmoid(xg) (gated activation), concatenated to the input.

    The kernel-2 convolution out[t] = A x[t - dilation] + B x[t] + b is written as two linear maps on the
    (E, T, C) layout, which makes the one-extra-step form (``extend``) a single row of it.
    """

    def __init__(self, channels: int, filters: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.added = filters
        self.now = nn.Linear(channels, 2 * filters)
        self.past = nn.Linear(channels, 2 * filters, bias=False)

    def gated(self, now: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        xf, xg = (self.now(now) + self.past(past)).chunk(2, dim=-1)
        return torch.tanh(xf) * torch.sigmoid(xg)

    def delayed(self, x: torch.Tensor) -> torch.Tensor:
        """(E, T, C) -> (E, T + d, C) with d zero steps in front: index t holds x[t - d] (zero before the start)."""
        return F.pad(x, (0, 0, self.dilation, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.gated(x, self.delayed(x)[:, : x.shape[1]])], dim=-1)

    def extend(self, prefix: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        # Step S sees x[S - d]: index S of the delayed prefix (length S + d), i.e. its index -d.
        return torch.cat([step, self.gated(step, self.delayed(prefix)[:, -self.dilation].unsqueeze(1))], dim=-1)


class AttentionLayer(CausalLayer):
    """Causal soft attention: keys, queries and values are affine maps of the steps, each step reads the values
    of the steps up to itself with softmax(q . k / sqrt(key size)), and the read is concatenated to the input."""

    def __init__(self, channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.added = value_size
        self.scale = 1 / math.sqrt(key_size)
        self.key = nn.Linear(channels, key_size)
        self.query = nn.Linear(channels, key_size)
        self.value = nn.Linear(channels, value_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.query(x) @ self.key(x).transpose(-1, -2) * self.scale  # (E, T, T)
        future = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        probs = logits.masked_fill(future, float("-inf")).softmax(-1)
        return torch.cat([x, probs @ self.value(x)], dim=-1)

    def extend(self, prefix: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        query = self.query(step)  # (E, Q, K)
        to_prefix = query @ self.key(prefix).transpose(-1, -2)  # (E, Q, S): the prefix's keys, shared by all queries
        to_self = (query * self.key(step)).sum(-1, keepdim=True)  # (E, Q, 1): each step sees itself, no other query
        probs = (torch.cat([to_prefix, to_self], dim=-1) * self.scale).softmax(-1)
        read = probs[..., :-1] @ self.value(prefix) + probs[..., -1:] * self.value(step)
        return torch.cat([step, read], dim=-1)


def tc_block(channels: int, sequence_length: int, filters: int) -> list[DenseLayer]:
    """TC(T, D): dense layers with dilations 1, 2, 4, ... (ceil(log2 T) of them), so the last step's receptive
    field covers the whole sequence. The paper's pseudo-code counts i from 1 (dilations 2, 4, ...), which would
    leave odd offsets unseen; starting at 1 is the receptive field its text describes."""
    layers: list[DenseLayer] = []
    for i in range(math.ceil(math.log2(sequence_length))):
        layers.append(DenseLayer(channels, filters, 2**i))
        channels += filters
    return layers


@register_method("snail")
class SNAIL(SequenceMethod):
    """Options: ``way`` (label slots and logits: the episodes' N), ``sequence_length`` (T = N*K + 1: sets the
    TC blocks' depth; other lengths still run, attention reaching every step), ``tc_filters`` (D of the TC
    blocks), ``attention`` (the three blocks' [key size, value size]), ``batch_norm_over`` (training's BatchNorm
    statistics: each ``episode``'s images or the whole ``meta_batch``'s; fsltool.methods.sequence)."""

    def __init__(
        self,
        backbone: Backbone,
        way: int = 5,
        sequence_length: int = 6,
        tc_filters: int = 128,
        attention: list[list[int]] | None = None,
        batch_norm_over: str = "episode",
    ) -> None:
        super().__init__(backbone, way, batch_norm_over)
        require_positive_int(self.name, "sequence_length", sequence_length)
        if sequence_length < 2:
            raise option_error(self.name, "sequence_length", f"must be at least 2 (support and query), got {sequence_length}")
        require_positive_int(self.name, "tc_filters", tc_filters)
        sizes = [[64, 32], [256, 128], [512, 256]] if attention is None else attention
        if (
            not isinstance(sizes, list)
            or len(sizes) != 3
            or any(not isinstance(pair, list) or len(pair) != 2 for pair in sizes)
        ):
            raise option_error(self.name, "attention", f"must be three [key size, value size] pairs, got {attention!r}")
        for key_size, value_size in sizes:
            require_positive_int(self.name, "attention", key_size)
            require_positive_int(self.name, "attention", value_size)
        channels = self.embedding_size + way
        layers: list[CausalLayer] = []
        for i, (key_size, value_size) in enumerate(sizes):
            block = tc_block(channels, sequence_length, tc_filters) if i else []
            channels += sum(layer.added for layer in block)
            layers += [*block, AttentionLayer(channels, key_size, value_size)]
            channels += value_size
        self.layers = nn.ModuleList(layers)
        self.output = nn.Linear(channels, way)

    def sequence_outputs(self, steps: torch.Tensor) -> torch.Tensor:
        """(E, T, D + way) whole sequences -> (E, T, way) logits at every step (causal: step t sees steps <= t)."""
        for layer in self.layers:
            steps = layer(steps)
        return self.output(steps)

    def query_logits(self, support: torch.Tensor, support_onehot: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """The support sequence runs once; each query is the step after it, with an all-zero label. The last
        layer's outputs at the support steps are never read, so that layer only extends."""
        prefix = torch.cat([support, support_onehot], dim=-1)
        step = torch.cat([query, query.new_zeros(*query.shape[:-1], support_onehot.shape[-1])], dim=-1)
        *inner, last = self.layers
        for layer in inner:
            prefix, step = layer(prefix), layer.extend(prefix, step)
        return self.output(last.extend(prefix, step))
