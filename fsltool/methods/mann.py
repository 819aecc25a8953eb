"""Memory-augmented neural network (Santoro et al. 2016): an LSTM controller reads and writes an external memory
by content, writing with least-recently-used access (LRUA), over a sequence in which each image arrives with the
previous step's label, so the network must bind labels to classes through its memory.

Per step t, with n read heads (one key k, add vector a, write gate alpha and key strength beta per head):
  write weights  w_w = sigmoid(alpha) w_r(t-1) + (1 - sigmoid(alpha)) w_lu(t-1)
  memory         M = M(t-1) with its least-used slot zeroed, + sum over heads of w_w a^T
  read weights   w_r = softmax(beta * cosine(k, M rows));  reads r = w_r M
  usage          w_u = gamma w_u(t-1) + sum over heads of (w_r + w_w)
  least used     w_lu = 1 on the n slots of smallest usage, 0 elsewhere
  controller in  [x_t, one-hot y_(t-1), r(t-1)];  output  logits = W [h_t, r_t]
Two departures, both from the Neural Turing Machine the paper builds on: a key strength beta = 1 + softplus(.)
(a plain cosine lies in [-1, 1], so a softmax over 128 slots could never read one slot sharply), and an add
vector a written in place of the key (the paper writes k itself, so the read that follows a write retrieves
mostly the step's own key; the add vector is also what the public reimplementations of the paper write).

Image features are the recipe's backbone (Conv-4, 64-d on 28x28), not the paper's raw 20x20 pixels: the paper
trained 100,000 episodes to learn its pixel-space addressing; a convolutional embedding, trained end to end
through the memory, gives cosine addressing stroke-invariant features within a CPU budget.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch._higher_order_ops.scan import scan

from fsltool.data.episodes import Episode
from fsltool.methods.base import (
    ExportGraph,
    StepOutput,
    TaskShare,
    class_onehot,
    method_options,
    option_error,
    register_method,
    require_bool,
    require_positive_int,
)
from fsltool.methods.sequence import SequenceMethod, first_columns
from fsltool.models.backbones import Backbone


# Key strengths start near 1 + softplus(5) = 6: reads single out slots from the first episode. In a trial on toy
# sequences (5 classes x 4 instances) 4 heads with this start bound labels within ~400 updates; 1 head did not.
STRENGTH_BIAS = 5.0


def least_used(usage: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) usage -> (B, N) weights: 1 on the ``count`` least-used slots, 0 elsewhere."""
    return torch.zeros_like(usage).scatter(-1, usage.topk(count, dim=-1, largest=False).indices, 1.0)


def lrua_write_weights(gate: torch.Tensor, previous_read: torch.Tensor, least: torch.Tensor) -> torch.Tensor:
    """(B, H, 1) gate in (0, 1), (B, H, N) previous read weights, (B, N) least-used weights -> (B, H, N): write
    to where a head last read (gate near 1: update a memory) or to the least-used slots (near 0: a new one)."""
    return gate * previous_read + (1 - gate) * least.unsqueeze(1)


def content_weights(keys: torch.Tensor, memory: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """(B, H, M) keys, (B, N, M) memory, (B, H) strengths -> (B, H, N) read weights, each row summing to one."""
    similarity = F.normalize(keys, dim=-1, eps=1e-8) @ F.normalize(memory, dim=-1, eps=1e-8).transpose(-1, -2)
    return (strength.unsqueeze(-1) * similarity).softmax(-1)


class ControllerCell(nn.Module):
    """The LSTM alone (``controller_only``: the paper's LSTM baseline). State [h, c]; output h."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTMCell(input_size, hidden)
        self.output_size = hidden

    def initial_state(self, batch: int, like: torch.Tensor) -> list[torch.Tensor]:
        return [like.new_zeros(batch, self.lstm.hidden_size), like.new_zeros(batch, self.lstm.hidden_size)]

    def forward(self, state: list[torch.Tensor], x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, c = self.lstm(x, (state[0], state[1]))
        return [h, c], h.clone()  # scan (export) forbids an output that aliases the carried state


class MemoryCell(nn.Module):
    """One step of the LSTM controller with its LRUA memory (module docstring).
    State [h, c, memory (B, N, M), read weights (B, H, N), usage (B, N), reads (B, H*M)]; output [h, reads]."""

    def __init__(self, input_size: int, hidden: int, slots: int, slot_size: int, heads: int, gamma: float) -> None:
        super().__init__()
        self.slots, self.slot_size, self.heads, self.gamma = slots, slot_size, heads, gamma
        self.lstm = nn.LSTMCell(input_size + heads * slot_size, hidden)
        self.keys = nn.Linear(hidden, heads * slot_size)
        self.adds = nn.Linear(hidden, heads * slot_size)
        self.gates = nn.Linear(hidden, heads)
        self.strengths = nn.Linear(hidden, heads)
        nn.init.constant_(self.strengths.bias, STRENGTH_BIAS)
        self.output_size = hidden + heads * slot_size

    def initial_state(self, batch: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Empty reads; memory at a small constant (cosine needs non-zero rows); usage a tiny increasing ramp so
        the least-used slots are the same in every runtime (top-k does not define an order among ties)."""
        hidden = self.lstm.hidden_size
        usage = torch.arange(self.slots, dtype=like.dtype, device=like.device).mul(1e-6).expand(batch, -1)
        return [
            like.new_zeros(batch, hidden),
            like.new_zeros(batch, hidden),
            like.new_full((batch, self.slots, self.slot_size), 1e-6),
            like.new_zeros(batch, self.heads, self.slots),
            usage.clone(),
            like.new_zeros(batch, self.heads * self.slot_size),
        ]

    def forward(self, state: list[torch.Tensor], x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, c, memory, read_weights, usage, reads = state
        h, c = self.lstm(torch.cat([x, reads], dim=-1), (h, c))
        keys = torch.tanh(self.keys(h)).view(-1, self.heads, self.slot_size)
        adds = torch.tanh(self.adds(h)).view(-1, self.heads, self.slot_size)
        gate = torch.sigmoid(self.gates(h)).unsqueeze(-1)
        strength = 1 + F.softplus(self.strengths(h))
        write_weights = lrua_write_weights(gate, read_weights, least_used(usage, self.heads))
        emptied = torch.ones_like(usage).scatter(-1, usage.argmin(-1, keepdim=True), 0.0)  # the least-used slot, zeroed first
        memory = memory * emptied.unsqueeze(-1) + write_weights.transpose(-1, -2) @ adds
        read_weights = content_weights(keys, memory, strength)
        reads = (read_weights @ memory).flatten(1)
        usage = self.gamma * usage + read_weights.sum(1) + write_weights.sum(1)
        return [h, c, memory, read_weights, usage, reads], torch.cat([h, reads], dim=-1)


class Unroll(nn.Module):
    """A cell run over a (T, B, F) sequence: a Python loop here, TorchScript's loop once scripted."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, state: list[torch.Tensor], steps: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        outputs: list[torch.Tensor] = []
        for x in steps.unbind(0):
            state, output = self.cell(state, x)
            outputs.append(output)
        return state, torch.stack(outputs)


@register_method("mann")
class MANN(SequenceMethod):
    """Options: ``way`` (label slots and logits), ``hidden`` (LSTM units), ``slots`` x ``slot_size`` (memory),
    ``heads`` (read heads; also the number of least-used slots), ``gamma`` (usage decay), ``controller_only`` (no
    memory: the LSTM baseline), ``sequence_training`` (train on the paper's protocol: every image of the training
    episode, support and queries, in one shuffled labelled sequence with a loss at every step; its meta-batch always
    shares one backbone pass), ``batch_norm_over`` (without it: training's BatchNorm statistics over each ``episode``
    or the whole ``meta_batch``; fsltool.methods.sequence)."""

    def __init__(
        self,
        backbone: Backbone,
        way: int = 5,
        hidden: int = 200,
        slots: int = 128,
        slot_size: int = 40,
        heads: int = 4,
        gamma: float = 0.95,
        controller_only: bool = False,
        sequence_training: bool = False,
        batch_norm_over: str = "episode",
    ) -> None:
        super().__init__(backbone, way, batch_norm_over)
        require_bool(self.name, "controller_only", controller_only)
        require_bool(self.name, "sequence_training", sequence_training)
        memory_options = {"slots": slots, "slot_size": slot_size, "heads": heads, "gamma": gamma}
        if controller_only:
            defaults = method_options(self.name)
            for key, value in memory_options.items():
                if value != defaults[key].default:
                    raise option_error(self.name, key, f"applies only to the memory, which 'controller_only: true' removes (got {value!r})")
        for key, value in (("hidden", hidden), ("slots", slots), ("slot_size", slot_size), ("heads", heads)):
            require_positive_int(self.name, key, value)
        if heads > slots:
            raise option_error(self.name, "heads", f"({heads}) must not exceed method_options.slots ({slots})")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
            raise option_error(self.name, "gamma", f"must be a number in [0, 1], got {gamma!r}")
        self.sequence_training = sequence_training
        input_size = self.embedding_size + way
        cell = ControllerCell(input_size, hidden) if controller_only else MemoryCell(input_size, hidden, slots, slot_size, heads, float(gamma))
        self.unroll = Unroll(cell)
        self.output = nn.Linear(cell.output_size, way)
        self.scripted_unroll: nn.Module | None = None  # set on the copy that export traces

    def run(self, state: list[torch.Tensor], steps: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The recurrence over (T, B, F) steps, with T dynamic in both exports: torch.export sees a scan (ONNX
        Scan) and torch.jit.trace a scripted loop, where a traced Python loop would fix T to the example's."""
        if torch.compiler.is_exporting():
            return scan(self.unroll.cell, state, steps)
        if torch.jit.is_tracing() and self.scripted_unroll is not None:
            return self.scripted_unroll(state, steps)
        return self.unroll(state, steps)

    def sequence_logits(self, embeddings: torch.Tensor, labels_onehot: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(E, T, D) images, (E, T, slots) their one-hot labels -> the state after the sequence, and (E, T, slots)
        logits at every step, step t given label t - 1 (so no step sees its own label)."""
        previous = F.pad(labels_onehot, (0, 0, 1, 0))[:, :-1]
        steps = torch.cat([embeddings, previous], dim=-1).transpose(0, 1)
        state, outputs = self.run(self.unroll.cell.initial_state(embeddings.shape[0], embeddings), steps)
        return state, self.output(outputs).transpose(0, 1)

    def query_logits(self, support: torch.Tensor, support_onehot: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Each query continues the support sequence's state for one step, given the last support label (the
        label that step would receive); its own label is never shown, and no query sees another."""
        state, _ = self.sequence_logits(support, support_onehot)
        episodes, queries = query.shape[:2]
        state = [s.unsqueeze(1).expand(-1, queries, *s.shape[1:]).flatten(0, 1) for s in state]
        last_label = support_onehot[:, -1:].expand(-1, queries, -1)
        _, output = self.unroll.cell(state, torch.cat([query, last_label], dim=-1).flatten(0, 1))
        return self.output(output).view(episodes, queries, -1)

    def sequence_scores(self, embeddings: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
        """(E, T, D), (E, T) -> (E, T, way): the paper's protocol, a prediction at every step of a labelled sequence."""
        self.check_episode(embeddings.shape[-1], way)
        return first_columns(self.sequence_logits(embeddings, class_onehot(labels, self.way, embeddings.dtype))[1], way)

    def meta_step(self, episodes: list[Episode], share: TaskShare | None = None) -> list[StepOutput]:
        """With ``sequence_training``: each episode's images (support and queries) in one random order, a
        cross-entropy at every step, and the meta-batch's sequences run as one batch through one recurrence.
        The scores returned (for the training log) are those at the query images' steps, in the episode's order."""
        if not self.sequence_training:
            return super().meta_step(episodes, share)
        first = episodes[0]
        labels = torch.cat([first.support_labels, first.query_labels]).expand(len(episodes), -1)
        order = self.random_orders(len(episodes), labels.shape[1], share)
        images = torch.stack([torch.cat([e.support, e.query]) for e in episodes])
        images = images[torch.arange(len(episodes)).unsqueeze(1), order]
        labels = labels.gather(1, order)
        embeddings = self.backbone(images.flatten(0, 1)).unflatten(0, order.shape)
        scores = self.sequence_scores(embeddings, labels, first.shape.way)
        losses = F.cross_entropy(scores.transpose(1, 2), labels, reduction="none").mean(1)
        in_episode_order = scores.gather(1, order.argsort(1).unsqueeze(-1).expand_as(scores))
        return [StepOutput(loss, s[len(first.support_labels) :]) for loss, s in zip(losses, in_episode_order)]

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        """Graphs of a copy that carries a scripted loop for torch.jit.trace (a submodule, as tracing requires)."""
        exported = copy.deepcopy(self).eval()
        exported.scripted_unroll = torch.jit.script(exported.unroll)
        return SequenceMethod.export_graphs(exported, example)
