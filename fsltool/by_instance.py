"""Accuracy by instance number (Santoro et al. 2016's protocol): each episode's images shown as one labelled
sequence in random order, each image with the previous step's label, and accuracy reported separately for the
1st, 2nd, ... presentation of a class. Only methods that predict at every step of such a sequence (``mann``)
take part.

The sequences come from the same episodes as ``evaluate`` (stored test episodes, or seeded fresh ones): each
class contributes its first ``instances`` images (support, then queries), so every class is presented exactly
``instances`` times; the order is a seeded permutation per episode, the same for every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fsltool.data.episodes import EpisodeShape
from fsltool.data.store import FewShotData
from fsltool.device import work_sizes
from fsltool.errors import FsltoolError
from fsltool.evaluate import check_runtime, embed_all, episode_indices, rows_into_one
from fsltool.methods import Method

ORDER_SEED = 0  # the permutation of every episode's sequence: fixed, so all runs see the same sequences


@dataclass
class InstanceResult:
    split: str
    shape: EpisodeShape
    accuracies: np.ndarray  # (episodes, instances): fraction of the classes whose k-th presentation was right
    episodes_from: str
    runtime: str = "torch"  # what embedded the images

    def ci95(self) -> np.ndarray:
        return 1.96 * self.accuracies.std(0, ddof=1) / math.sqrt(len(self.accuracies)) * 100

    def to_json(self) -> dict[str, Any]:
        means, cis = self.accuracies.mean(0) * 100, self.ci95()
        return {
            "protocol": "accuracy by instance number (labelled sequences, label of step t-1 given at step t)",
            "way": self.shape.way,
            "instances": self.accuracies.shape[1],
            "sequence_length": self.shape.way * self.accuracies.shape[1],
            "episodes": len(self.accuracies),
            "split": self.split,
            "episodes_from": f"{self.episodes_from} {self.shape}",
            "runtime": self.runtime,
            "by_instance": {str(k + 1): {"accuracy": round(float(m), 4), "ci95": round(float(c), 4)} for k, (m, c) in enumerate(zip(means, cis))},
        }


def sequence_of(support: np.ndarray, query: np.ndarray, shape: EpisodeShape, instances: int) -> tuple[np.ndarray, np.ndarray]:
    """(episodes, way*shot), (episodes, way*query) class-ordered indices -> (episodes, way*instances) image indices
    and their labels, class by class (each class's support images first, then its queries)."""
    per_class = np.concatenate([support.reshape(len(support), shape.way, shape.shot), query.reshape(len(query), shape.way, shape.query)], axis=2)
    images = per_class[:, :, :instances].reshape(len(support), -1)
    return images, np.broadcast_to(np.arange(shape.way).repeat(instances), images.shape)


@torch.inference_mode()
def accuracy_by_instance(
    method: Method,
    data: FewShotData,
    split: str,
    shape: EpisodeShape,
    *,
    instances: int = 10,
    episodes: int | None = None,
    sample_seed: int | None = None,
    runtime: str = "torch",
) -> InstanceResult:
    """Per-episode accuracy at each instance number 1..``instances`` on sequences built from ``shape``'s episodes;
    each distinct image embedded once by ``runtime`` (as ``evaluate --runtime``), the sequence read by PyTorch."""
    if not hasattr(method, "sequence_scores"):
        raise FsltoolError(f"method {method.name!r} does not predict along labelled sequences; --by-instance needs 'mann'")
    check_runtime(method, runtime)
    if shape.per_class < instances:
        raise FsltoolError(f"--by-instance shows each class {instances} times, but {shape} episodes have {shape.per_class} images per class")
    support, query, origin = episode_indices(data, split, shape, episodes, sample_seed)
    images, labels = sequence_of(support, query, shape, instances)
    generator = torch.Generator().manual_seed(ORDER_SEED)
    order = torch.stack([torch.randperm(images.shape[1], generator=generator) for _ in range(len(images))]).numpy()
    images, labels = np.take_along_axis(images, order, 1), torch.from_numpy(np.take_along_axis(labels, order, 1))
    was_training = method.training
    method.eval()
    try:
        unique, inverse = np.unique(images, return_inverse=True)
        embeddings = embed_all(method, data, unique, runtime=runtime)  # on the method's device
        embeddings = embeddings[torch.from_numpy(inverse.reshape(images.shape)).to(embeddings.device)]
        per_call = work_sizes(embeddings.device).sequences  # the recurrence is step by step: wide batches amortise it
        predictions = rows_into_one((
            method.sequence_scores(embeddings[i : i + per_call], labels[i : i + per_call].to(embeddings.device), shape.way).argmax(-1).cpu()
            for i in range(0, len(images), per_call)
        ), len(images))
    finally:
        method.train(was_training)
    onehot = torch.nn.functional.one_hot(labels, shape.way)
    instance = (onehot.cumsum(1) * onehot).sum(-1) - 1  # (episodes, steps): how many times the class was seen before
    correct = (predictions == labels).double()
    accuracies = torch.zeros(len(images), instances, dtype=torch.float64).scatter_add_(1, instance, correct) / shape.way
    return InstanceResult(split, shape, accuracies.numpy(), origin, runtime)
