"""Calibrated confidence and "none of these" rejection, in numpy alone (``predict`` runs where torch is absent).

- Temperature scaling (Guo et al. 2017): probabilities are softmax(scores / T), one T > 0 fitted by minimising the
  negative log-likelihood of the validation queries' labels. The NLL is convex in 1/T, hence unimodal in log T, so a
  golden-section search over a bracket of log T finds its minimum without a step size to tune.
- Expected calibration error over ``ECE_BINS`` equal-width bins of the top probability.
- Open-set rejection: a query is accepted when its confidence (``OPEN_SET_SCORES``) is above a threshold fitted on
  validation queries of classes outside their episode, so that at most the chosen fraction of them is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsltool.errors import FsltoolError

ECE_BINS = 15  # Guo et al. 2017's count
LOG_T_BRACKET = (math.log(1e-3), math.log(1e3))  # T searched between 0.001 and 1000
GOLDEN_STEPS = 100  # shrinks the bracket by 0.618^100: far below float64 resolution of log T


def softmax(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(scores / temperature) over the last axis, in float64."""
    scaled = np.asarray(scores, dtype=np.float64) / temperature
    shifted = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class), each probability floored at the smallest positive float64."""
    true = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(true, np.finfo(np.float64).tiny)).mean())


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over bins b of |b|/n * |accuracy(b) - mean top probability(b)|; bin i holds top probabilities in
    (i/bins, (i+1)/bins] (the first bin also holds 0)."""
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, correct.astype(np.float64), bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / count.sum())


def fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the NLL of softmax(scores / T) on (queries, classes) ``scores`` with true ``labels``."""
    def loss(log_t: float) -> float:
        return negative_log_likelihood(softmax(scores, math.exp(log_t)), labels)

    low, high = LOG_T_BRACKET
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(GOLDEN_STEPS):
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return math.exp((low + high) / 2)


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling known from unknown queries by confidence (higher = known): the chance
    that a random known query scores above a random unknown one, ties counting one half (Mann-Whitney U)."""
    both = np.concatenate([known, unknown])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    average_rank = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties share their mean
    n_known, n_unknown = len(known), len(unknown)
    return float((average_rank[:n_known].sum() - n_known * (n_known + 1) / 2) / (n_known * n_unknown))


def fit_threshold(unknown_confidence: np.ndarray, false_accept_rate: float) -> float:
    """The threshold above which at most ``false_accept_rate`` of these unknown queries are accepted (exactly that
    fraction, rounded down, when no two tie): the (k+1)-th highest confidence, k = floor(rate * n)."""
    check_rate(false_accept_rate)
    ordered = np.sort(unknown_confidence)[::-1]
    return float(ordered[min(int(false_accept_rate * len(ordered)), len(ordered) - 1)])


def check_rate(rate: float) -> None:
    if not 0 < rate < 1:
        raise FsltoolError(f"--reject-rate {rate}: the fraction of unknown queries to accept must lie strictly between 0 and 1")


def _max_probability(scores: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(scores, temperature).max(axis=-1)


def _max_score(scores: np.ndarray, temperature: float) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64).max(axis=-1)


# What an open-set threshold compares, from a query's scores over the classes and the temperature.
OPEN_SET_SCORES: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "probability": _max_probability,  # the calibrated top probability: depends on how many classes compete
    "score": _max_score,  # the method's top raw score (ProtoNet: minus the squared distance to the nearest prototype)
}

# The default: on Omniglot ProtoNet 5w1s it tells unknown queries apart far better (AUROC 0.986 against 0.920), and
# unlike the top probability it does not change with the number of enrolled classes.
DEFAULT_OPEN_SET_SCORE = "score"


@dataclass(frozen=True)
class OpenSetThreshold:
    score: str  # a key of OPEN_SET_SCORES
    threshold: float  # queries whose score is above it are accepted
    false_accept_rate: float  # the fraction of validation unknown queries it was fitted to accept

    def accepted(self, scores: np.ndarray, temperature: float) -> np.ndarray:
        return OPEN_SET_SCORES[self.score](scores, temperature) > self.threshold


@dataclass(frozen=True)
class Calibration:
    """What a model carries into export and enrolment metadata (key ``calibration``) and ``predict`` applies."""

    temperature: float
    open_set: OpenSetThreshold | None = None

    def to_json(self) -> dict[str, Any]:
        open_set = None if self.open_set is None else vars(self.open_set).copy()
        return {"temperature": self.temperature, "open_set": open_set}

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], source: str) -> Calibration:
        """Read back ``to_json``'s form; ``source`` names where it came from in the error."""
        try:
            open_set = payload.get("open_set")
            threshold = None if open_set is None else OpenSetThreshold(
                str(open_set["score"]), float(open_set["threshold"]), float(open_set["false_accept_rate"]))
            calibration = cls(float(payload["temperature"]), threshold)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise FsltoolError(f"{source}: unreadable calibration ({error!r})") from None
        if not calibration.temperature > 0 or (threshold is not None and threshold.score not in OPEN_SET_SCORES):
            raise FsltoolError(f"{source}: invalid calibration {payload}")
        return calibration
