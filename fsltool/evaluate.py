"""Evaluation on stored (or freshly sampled, seeded) episodes: mean accuracy and its 95% confidence interval."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fsltool.data.augment import AugmentConfig, augmented_copies
from fsltool.data.episodes import EpisodeShape, draw_episodes, episode_labels, stack_episodes
from fsltool.device import device_of, work_sizes
from fsltool.data.store import FewShotData
from fsltool.data.transfer import upload
from fsltool.errors import FsltoolError
from fsltool.methods import METHODS, Method
from fsltool.methods.adaptation import batch_statistics

SUPPORT_ORDER_SEED = 0  # with the episode's index, seeds the support order an order-sensitive method is shown
CLASS_SORTED, SHUFFLED = "class-sorted", "shuffled (seeded per episode)"  # EvalResult.support_order


@dataclass(frozen=True)
class SupportCopies:
    """``evaluate --support-copies``: each support image replaced by ``count`` copies augmented with ``augment``, as
    RFS's evaluation fits its classifier on 5 augmented copies (``n_aug_support_samples``; the queries as they are)."""

    count: int
    augment: AugmentConfig


@dataclass
class EvalResult:
    split: str
    shape: EpisodeShape
    accuracies: np.ndarray  # per episode, fraction correct
    episodes_from: str  # "stored" or "sampled (seed N)"
    transductive: bool = False  # True when queries of an episode influence each other's scores (BatchNorm)
    support_order: str = CLASS_SORTED  # the order the support set was shown in: CLASS_SORTED or SHUFFLED
    runtime: str = "torch"  # what embedded the images: a key of RUNTIMES
    ensemble: int = 1  # how many models' mean scores classified each query
    support_copies: int = 0  # augmented copies that stood for each support image (0: the images themselves)

    @property
    def accuracy(self) -> float:
        return float(self.accuracies.mean() * 100)

    @property
    def ci95(self) -> float:
        """1.96 * sample std / sqrt(n), in percent."""
        n = len(self.accuracies)
        return float(1.96 * self.accuracies.std(ddof=1) / math.sqrt(n) * 100) if n > 1 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": round(self.accuracy, 4),
            "ci95": round(self.ci95, 4),
            "episodes": len(self.accuracies),
            "way": self.shape.way,
            "shot": self.shape.shot,
            "query": self.shape.query,
            "split": self.split,
            "episodes_from": self.episodes_from,
            "transductive": self.transductive,
            "support_order": self.support_order,
            "runtime": self.runtime,
            "ensemble": self.ensemble,
            "support_copies": self.support_copies,
        }


def inference_copy(network: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A frozen TorchScript copy for inference: BatchNorm folded into the convolutions, oneDNN-friendly layouts.

    Measured ~1.4x faster than eager for Conv-4 on 2 cores (scripts/benchmark.py); outputs agree to ~1e-5.
    Falls back to the eager network where a backbone cannot be traced.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(copy.deepcopy(network).eval(), example)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except (RuntimeError, torch.jit.Error):  # pragma: no cover - depends on the backbone
        return network


def onnx_copy(network: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime copy (fsltool.export.onnx_inference_copy), imported when asked for: onnx and onnxruntime
    would add their import time to every command that evaluates (training's validation too)."""
    from fsltool.export import onnx_inference_copy

    return onnx_inference_copy(network, example)


# What embeds the images in evaluation (``evaluate --runtime``): the network and a first batch -> a copy to call.
RUNTIMES: dict[str, Callable[[nn.Module, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "torch": inference_copy,
    "onnx": onnx_copy,
}


def rows_into_one(chunks: Iterator[torch.Tensor], rows: int) -> torch.Tensor:
    """``torch.cat(list(chunks))`` (``rows`` in all), written into one tensor allocated with the first chunk, so that
    no chunk outlives its own iteration. Under the CLI's allocator setting (fsltool/platform_tuning.py: freed blocks
    stay in glibc's heap) a chunk kept for a final cat sits inside the freed block of its iteration's activations,
    and the next iteration's activations grow the heap around it: a 600-episode transductive evaluation grew to
    gigabytes (docs/speed.md, "The C allocator")."""
    first = next(chunks)
    out = first.new_empty(rows, *first.shape[1:])
    out[: len(first)] = first
    start = len(first)
    del first
    for chunk in chunks:
        out[start : start + len(chunk)] = chunk
        start += len(chunk)
        del chunk
    return out


class Embedder:
    """What embeds images in evaluation: the method's network frozen into a ``runtime`` copy (``frozen``) or eager.
    A copy is traced or exported on its first batch (it needs an example), then reused: one evaluation that embeds
    two sets of images (support copies, then queries) pays for one copy, not two."""

    def __init__(self, method: Method, *, frozen: bool = True, runtime: str = "torch") -> None:
        self.method, self.frozen, self.runtime = method, frozen, runtime
        self._call: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self._call is None:
            self._call = RUNTIMES[self.runtime](self.method.embedding_network(), batch) if self.frozen else self.method.embed
        return self._call(batch)


@torch.inference_mode()
def embed_all(method: Method, data: FewShotData, indices: np.ndarray, *, frozen: bool = True, runtime: str = "torch",
              copies: SupportCopies | None = None, embedder: Embedder | None = None) -> torch.Tensor:
    """Embeddings of the images at ``indices`` (eval mode), computed on the method's device; with ``copies``, of
    each image's augmented copies instead (``copies.count`` rows per image, one after the other). The images are
    read a block of ``gather_bytes`` at a time and embedded in passes of ``embed_images``, the passes back to back:
    on the CPU small passes with no other work between them run fastest (Conv-4, 2 cores: 64-image passes from
    16 MiB blocks took 1.3-1.5 s for 25,744 Omniglot images against 1.9-2.4 s for 128-image passes each read just
    before it; reading between passes wakes PyTorch's thread pool, which then competes with the embedding's).
    ``embedder`` (one shared by several calls) replaces the one made from ``frozen`` and ``runtime``."""
    device = device_of(method)
    sizes = work_sizes(device)
    per_image = 1 if copies is None else copies.count
    image_bytes = 4 * int(np.prod(data.image_shape)) * per_image
    per_block = max(1, sizes.gather_bytes // (image_bytes * sizes.embed_images)) * sizes.embed_images
    starts = range(0, len(indices), per_block)
    blocks = (data.images(indices[i : i + per_block], device) for i in starts)
    if copies is not None:
        blocks = (augmented_copies(block, indices[i : i + per_block], copies.count, copies.augment) for i, block in zip(starts, blocks))
    passes = (block[j : j + sizes.embed_images] for block in blocks for j in range(0, len(block), sizes.embed_images))
    embed = embedder or Embedder(method, frozen=frozen, runtime=runtime)
    return rows_into_one((embed(batch) for batch in passes), len(indices) * per_image)


def support_orders(episodes: np.ndarray, length: int) -> np.ndarray:
    """(len(episodes), length) support orders: episode i's is a permutation drawn from SeedSequence([
    SUPPORT_ORDER_SEED, i]), so every run and every evaluation of an episode set (or of its first n episodes) shows
    an order-sensitive method the same sequences, whatever the method or the rest of the set."""
    return np.array([np.random.default_rng(np.random.SeedSequence([SUPPORT_ORDER_SEED, int(i)])).permutation(length)
                     for i in episodes], dtype=np.int64).reshape(len(episodes), length)


def members(method: Method | Sequence[Method]) -> list[Method]:
    """One method, or the members of an ensemble (checkpoints of one run), as a list."""
    return [method] if isinstance(method, Method) else list(method)


def episode_accuracies(
    method: Method | Sequence[Method], data: FewShotData, shape: EpisodeShape, support: np.ndarray, query: np.ndarray,
    runtime: str = "torch", query_batch_statistics: bool = False, copies: SupportCopies | None = None,
) -> np.ndarray:
    """Per-episode accuracy: the fraction of each episode's queries whose best-scored class is theirs. An ensemble
    (several methods, as MAML++'s code tests its five best-validated checkpoints) scores by its members' mean
    scores (logits)."""
    query_labels = episode_labels(shape)[1]
    ensemble = members(method)
    scores = sum(query_batch_scores(member, data, shape, support, query) if query_batch_statistics
                 else episode_scores(member, data, shape, support, query, runtime, copies) for member in ensemble) / len(ensemble)
    return (scores.argmax(-1) == query_labels).float().mean(-1).numpy()


@torch.inference_mode()
def query_batch_scores(method: Method, data: FewShotData, shape: EpisodeShape, support: np.ndarray, query: np.ndarray) -> torch.Tensor:
    """Scores (episodes, queries, way) on the CPU under the transductive protocol of the Relation Network and MAML
    papers' code: every BatchNorm layer normalises an episode's support set with the support set's batch
    statistics and its queries with the query batch's (the relation module: with all the episode's pairs), so
    each query's score depends on the other queries. Runs on a copy of the method, whose running statistics the
    batch-statistics passes would otherwise move. Methods that adapt to each episode (MAML, Reptile) run their
    own ``transductive_bn`` mode on a copy (Method.transductive_copy)."""
    if not method.embeds_independently:
        adapting = method.transductive_copy()  # MAML, Reptile: their own transductive_bn mode
        if adapting is None:
            raise FsltoolError(f"--transductive: method {method.name!r} neither embeds each image on its own nor has a "
                               "transductive BatchNorm mode")
        return episode_scores(adapting, data, shape, support, query)
    copy_of_method, device = copy.deepcopy(method).eval(), device_of(method)
    support, support_labels = shown_support(method, shape, support)
    labels = torch.from_numpy(support_labels).to(device)

    def episode_by_episode() -> Iterator[torch.Tensor]:
        for support_indices, shown_labels, query_indices in zip(support, labels, query):
            support_emb = copy_of_method.embed(data.images(support_indices, device))
            query_emb = copy_of_method.embed(data.images(query_indices, device))
            yield copy_of_method.scores_from_embeddings(support_emb[None], shown_labels[None], query_emb[None], shape.way).float()

    with batch_statistics(copy_of_method):
        return rows_into_one(episode_by_episode(), len(support)).cpu()


def shown_support(method: Method, shape: EpisodeShape, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The support indices and labels (episodes, S) in the order the method is shown them: as stored (class by
    class), or, for an ``order_sensitive`` method, in the seeded order of ``support_orders``."""
    support_labels = np.tile(episode_labels(shape)[0].numpy(), (len(support), 1))
    if method.order_sensitive:
        order = support_orders(np.arange(len(support)), support.shape[1])
        support, support_labels = np.take_along_axis(support, order, 1), np.take_along_axis(support_labels, order, 1)
    return support, support_labels


def episode_scores(
    method: Method, data: FewShotData, shape: EpisodeShape, support: np.ndarray, query: np.ndarray, runtime: str = "torch",
    copies: SupportCopies | None = None,
) -> torch.Tensor:
    """Scores (episodes, queries, way) on the CPU. ``query`` may hold more images per episode than ``shape``
    lays out (e.g. unknown-class queries after the known ones): each is scored against the support set (their
    labels are not read).
    Episode-independent embeddings are computed once per distinct image, by the copy ``runtime`` names (a key of
    RUNTIMES: any runtime can run this one network, and the scores stay in PyTorch); other methods score
    ``method.episodes_per_call`` episodes per call under no_grad, which a method that adapts at test time (MAML)
    may re-enable.

    Stored and sampled episodes are laid out class by class. An ``order_sensitive`` method (MANN, SNAIL: trained on
    shuffled support orders) would read that layout as a cue, so its support images and their labels are shown
    in the seeded order of ``support_orders``, episode i of ``support`` taking order i. With ``copies``, each
    support image is replaced by its augmented copies (``check_support_copies`` says which methods take them)."""
    check_runtime(method, runtime)
    check_support_copies(method, copies)
    support, support_labels = shown_support(method, shape, support)
    labels = upload(torch.from_numpy(support_labels), device_of(method))
    was_training = method.training
    method.eval()
    try:
        if method.embeds_independently:
            return _scores_from_embeddings(method, data, shape, support, labels, query, runtime, copies)
        device, step = device_of(method), method.episodes_per_call

        def call_by_call() -> Iterator[torch.Tensor]:
            for start in range(0, len(support), step):
                episodes = [replace(data.episode(s, q, shape, device), support_labels=s_labels)
                            for s, s_labels, q in zip(support[start : start + step], labels[start : start + step], query[start : start + step])]
                stacked_support, stacked_labels, stacked_query, _ = stack_episodes(episodes)
                with torch.no_grad():
                    scores = method.score_episodes(stacked_support, stacked_labels, stacked_query)
                yield scores.float()

        return rows_into_one(call_by_call(), len(support)).cpu()  # one copy to the host: no wait on the device per chunk
    finally:
        method.train(was_training)


def check_runtime(method: Method, runtime: str) -> None:
    """Only the torch runtime runs a whole method; the others run an embedding network computed once per image."""
    if runtime not in RUNTIMES:
        raise FsltoolError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "torch" and not method.embeds_independently:
        raise FsltoolError(f"--runtime {runtime}: method {method.name!r} does not embed each image once, independently "
                           "of its episode, so it evaluates with --runtime torch only")


def check_support_copies(method: Method, copies: SupportCopies | None) -> None:
    """Augmented support copies go to methods that embed each image on its own and classify from any number of
    support embeddings per class (``Method.takes_support_copies``)."""
    if copies is not None and not (method.embeds_independently and method.takes_support_copies):
        takers = ", ".join(name for name, kind in METHODS.items() if kind.takes_support_copies)
        raise FsltoolError(f"--support-copies: method {method.name!r} does not take augmented support copies; those that embed "
                           f"each image once and classify from any number of support images per class do: {takers}")


def _gathered(embeddings: torch.Tensor, inverse: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """The rows ``inverse`` of ``embeddings`` laid out as ``shape`` + their own shape."""
    return embeddings[torch.from_numpy(inverse).to(embeddings.device)].view(*shape, *embeddings.shape[1:])


def _episode_embeddings(method: Method, data: FewShotData, support: np.ndarray, query: np.ndarray, runtime: str,
                        copies: SupportCopies | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Support (E, S, ...) and query (E, Q, ...) embeddings, each distinct image embedded once; with ``copies``,
    support (E, copies x S, ...): the first copy of every support image, then the second, ... (RFS's layout)."""
    if copies is None:
        unique, inverse = np.unique(np.concatenate([support.ravel(), query.ravel()]), return_inverse=True)
        embeddings = embed_all(method, data, unique, runtime=runtime)  # (images, *feature shape): vectors or feature maps
        return _gathered(embeddings, inverse[: support.size], support.shape), _gathered(embeddings, inverse[support.size :], query.shape)
    embedder = Embedder(method, runtime=runtime)
    unique, inverse = np.unique(support, return_inverse=True)
    embeddings = embed_all(method, data, unique, copies=copies, embedder=embedder)
    per_image = _gathered(embeddings.view(len(unique), copies.count, *embeddings.shape[1:]), inverse.ravel(), support.shape)
    support_emb = per_image.movedim(2, 1).reshape(support.shape[0], -1, *embeddings.shape[1:])
    unique, inverse = np.unique(query, return_inverse=True)
    return support_emb, _gathered(embed_all(method, data, unique, embedder=embedder), inverse.ravel(), query.shape)


@torch.inference_mode()
def _scores_from_embeddings(
    method: Method, data: FewShotData, shape: EpisodeShape, support: np.ndarray, support_labels: torch.Tensor,
    query: np.ndarray, runtime: str, copies: SupportCopies | None = None,
) -> torch.Tensor:
    device = device_of(method)
    support_emb, query_emb = _episode_embeddings(method, data, support, query, runtime, copies)
    if copies is not None:
        support_labels = support_labels.repeat(1, copies.count)
    feature_shape = query_emb.shape[2:]
    per_call = max(1, work_sizes(device).score_elements // (query.shape[1] * shape.way * feature_shape.numel()))
    scores = (method.scores_from_embeddings(support_emb[i : i + per_call], support_labels[i : i + per_call],
                                            query_emb[i : i + per_call], shape.way).float()
              for i in range(0, len(support), per_call))
    return rows_into_one(scores, len(support)).cpu()


def episode_indices(
    data: FewShotData, split: str, shape: EpisodeShape, episodes: int | None, sample_seed: int | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Support and query index arrays of the episodes ``evaluate`` runs, and where they come from."""
    if sample_seed is None:
        support, query = data.stored_episodes(split, shape)
        if episodes is not None:
            support, query = support[:episodes], query[:episodes]
        return support, query, "stored"
    sampler = data.sampler(split, shape, torch.Generator().manual_seed(sample_seed))
    support, query = (a.astype(np.int64) for a in draw_episodes(sampler, episodes or 600))
    return support, query, f"sampled (seed {sample_seed})"


def evaluate(
    method: Method | Sequence[Method],
    data: FewShotData,
    split: str,
    shape: EpisodeShape,
    *,
    episodes: int | None = None,
    sample_seed: int | None = None,
    runtime: str = "torch",
    query_batch_statistics: bool = False,
    support_copies: SupportCopies | None = None,
) -> EvalResult:
    """Stored episodes of ``shape`` (the first ``episodes`` of them), or ``episodes`` freshly sampled with
    ``sample_seed`` when given (any shape the split can supply); images embedded by ``runtime``, or, with
    ``query_batch_statistics``, by PyTorch under the transductive protocol of ``query_batch_scores``. Several
    methods (checkpoints of one run) are scored as an ensemble (``episode_accuracies``). ``support_copies``: each
    support image replaced by augmented copies of it (``SupportCopies``)."""
    if query_batch_statistics and runtime != "torch":
        raise FsltoolError(f"--transductive embeds with batch statistics in PyTorch: it does not go with --runtime {runtime}")
    if query_batch_statistics and support_copies is not None:
        raise FsltoolError("--transductive normalises each episode's own images: it does not go with --support-copies")
    ensemble = members(method)
    for member in ensemble:
        check_support_copies(member, support_copies)
    support, query, origin = episode_indices(data, split, shape, episodes, sample_seed)
    accuracies = episode_accuracies(ensemble, data, shape, support, query, runtime, query_batch_statistics, support_copies)
    transductive = query_batch_statistics or any(getattr(member, "transductive", False) for member in ensemble)
    return EvalResult(split, shape, accuracies, origin, transductive,
                      SHUFFLED if ensemble[0].order_sensitive else CLASS_SORTED, runtime, len(ensemble),
                      support_copies.count if support_copies is not None else 0)
