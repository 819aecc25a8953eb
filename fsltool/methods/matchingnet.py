"""Matching Networks (Vinyals et al. 2016): a query's class distribution is the support labels mixed by an
attention over the support set, a softmax of cosine similarities; optionally with full context embeddings (FCE),
where the whole support set shapes every embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError
from fsltool.methods.base import (
    ExportGraph,
    Method,
    class_onehot,
    classifier_graph,
    embedding_graph,
    option_error,
    register_method,
    require_positive_int,
)
from fsltool.models.backbones import Backbone

FCE_STEPS = 5  # attention-LSTM read steps when the recipe does not say
MAX_ATTENTION_SCALE = 40.0  # keeps every attention weight above e^-80 / S: its log stays finite in float32


def matching_scores(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """(..., S, D), (..., S), (..., Q, D) -> (..., Q, way): log P(class | query) = log sum_i a(query, x_i) y_i,
    with a = softmax(scale * cosine); scale 1 is the paper's attention.

    Log-probabilities, so the default cross-entropy step is the paper's loss: cross-entropy adds
    logsumexp(scores) = log(sum of the probabilities) = log 1 = 0 to -log P(y), for every parameter value, so loss
    and gradients are those of nll_loss. The log never sees 0: cosines lie in [-1, 1], so every attention
    weight is at least e^(-2 scale) / S.
    """
    similarity = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(-1, -2)  # (..., Q, S)
    return ((scale * similarity).softmax(-1) @ class_onehot(support_labels, way, similarity.dtype)).log()


class FullContextEmbedding(nn.Module):
    """The paper's Appendix A, on one episode's backbone embeddings g'(x_i) (support) and f'(x) (queries).

    g(x_i, S) = forward + backward hidden state of a bidirectional LSTM over the support set (in its class-by-class
    order), plus g'(x_i) as a skip connection. f(x, S) = h_K of an LSTM that for K steps reads the support set:
    r = sum_i softmax_i(h . g(x_i)) g(x_i); (h^, c) = LSTM(f'(x), [h, r], c); h = h^ + f'(x).
    """

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.dim = dim
        self.steps = steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        # The paper feeds [h, r] as the previous hidden state. Gates linear in (f'(x), h, r) are those of an LSTM
        # cell whose input is [f'(x), r] and whose hidden state is h: the same function, with a standard cell.
        self.query_cell = nn.LSTMCell(2 * dim, dim)

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, D), (Q, D) -> g (S, D), f (Q, D)."""
        if support.shape[-1] != self.dim:
            raise FsltoolError(
                f"method 'matchingnet' with fce: the backbone gives {support.shape[-1]}-d embeddings but the LSTMs are "
                f"{self.dim}-d (its channel count): use images the backbone reduces to 1x1 maps (28x28 for conv4)"
            )
        forward, backward = self.support_lstm(support.unsqueeze(0))[0].squeeze(0).chunk(2, dim=-1)
        g = forward + backward + support
        # h starts at f'(x) (h^ = 0 before the first step, so the first read already attends from the query).
        h, c = query, torch.zeros_like(query)
        for _ in range(self.steps):
            read = (h @ g.T).softmax(-1) @ g
            h_hat, c = self.query_cell(torch.cat([query, read], dim=-1), (h, c))
            h = h_hat + query
        return g, h


@register_method("matchingnet")
class MatchingNet(Method):
    """Without FCE an image's embedding ignores the episode, so evaluation embeds each image once; with FCE the
    embeddings depend on the support set and evaluation runs episode by episode.

    ``attention_scale`` multiplies the cosines before the softmax (1: the paper). Cosines of ReLU embeddings lie
    in [0, 1], so at scale 1 the attention can barely prefer one support image over another, and training is
    slow: on Omniglot 5w1s, 82% validation accuracy after 1500 episodes. Metric scaling (Oreshkin et al. 2018,
    TADAM) is the known remedy; the Omniglot recipes use 10 and say so."""

    takes_support_copies = True  # without FCE, where it embeds each image once

    def __init__(self, backbone: Backbone, fce: bool = False, fce_steps: int = FCE_STEPS, attention_scale: float = 1.0) -> None:
        super().__init__(backbone)
        if not backbone.flatten:
            raise FsltoolError(
                f"method {self.name!r} compares embedding vectors, but the recipe's backbone keeps feature maps: "
                "use a flattening backbone (e.g. 'backbone: conv4') or drop 'flatten: false' from backbone_options"
            )
        if not isinstance(fce, bool):
            raise option_error(self.name, "fce", f"must be true or false, got {fce!r}")
        if fce:
            require_positive_int(self.name, "fce_steps", fce_steps)
        elif fce_steps != FCE_STEPS:
            raise option_error(self.name, "fce_steps", f"applies only with 'fce: true' (got fce_steps={fce_steps!r}, fce=false)")
        if isinstance(attention_scale, bool) or not isinstance(attention_scale, (int, float)) or not 0 < attention_scale <= MAX_ATTENTION_SCALE:
            raise option_error(self.name, "attention_scale", f"must be a number in (0, {MAX_ATTENTION_SCALE:g}], got {attention_scale!r}")
        self.attention_scale = float(attention_scale)
        self.context = FullContextEmbedding(backbone.embedding_size, fce_steps) if fce else None
        self.embeds_independently = not fce

    def forward(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        support_embeddings, query_embeddings = self.backbone_on_episode(support, query)
        if self.context is not None:
            support_embeddings, query_embeddings = self.context(support_embeddings, query_embeddings)
        return matching_scores(support_embeddings, support_labels, query_embeddings, support_labels.max() + 1, self.attention_scale)

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int
    ) -> torch.Tensor:
        return matching_scores(support, support_labels, query, way, self.attention_scale)

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        if self.context is not None:
            # Found by trying: the graph exports, but its support size is frozen at the example's, so it fails
            # at run time on any other way x shot (pytorch/pytorch#191855). Refuse rather than ship that.
            raise FsltoolError(
                f"method {self.name!r} with fce cannot be exported: torch's ONNX exporter fixes the length of the "
                "support-set LSTM to the example episode's, so the graph would not accept other way/shot; "
                "export a model trained with 'fce: false'"
            )
        return {"embedding": embedding_graph(self.backbone, example), "classifier": classifier_graph(self, example)}
