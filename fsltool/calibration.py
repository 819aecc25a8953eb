"""Fitting and evaluating a run's calibration on stored episodes: the softmax temperature (validation episodes),
an optional open-set threshold (validation episodes with unknown-class queries), and their effect on test
episodes (``fsltool evaluate --calibration`` / ``--open-set``).

The fit is kept in the run folder as ``calibration.json`` with the digest of the weights it was fitted on; export
and enrolment carry it into their metadata (``calibration_metadata``) and ``predict`` applies it. Every method's
scores become probabilities through a softmax in ``predict``, so every method can be calibrated: ProtoNet's and
the adaptation methods' scores are logits, Matching Networks' are log-probabilities (T flattens or sharpens
them), Relation Networks' are relation scores in [0, 1] whose plain softmax is nearly uniform (at most 0.40 at
5-way), so their fitted T (well below 1) is what turns them into probabilities at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsltool.atomic import atomic_write
from fsltool.checkpoint import TrainedModel, model_digest
from fsltool.confidence import (
    DEFAULT_OPEN_SET_SCORE,
    ECE_BINS,
    OPEN_SET_SCORES,
    Calibration,
    OpenSetThreshold,
    auroc,
    check_rate,
    expected_calibration_error,
    fit_temperature,
    fit_threshold,
    negative_log_likelihood,
    softmax,
)
from fsltool.data.episodes import EpisodeShape, episode_labels
from fsltool.data.store import FewShotData
from fsltool.data.unknowns import stored_unknowns
from fsltool.device import device_of
from fsltool.errors import FsltoolError
from fsltool.evaluate import episode_scores
from fsltool.loop import autocast_for

CALIBRATION_FILE = "calibration.json"
FORMAT = "fsltool-calibration-1"
TRADE_OFF_RATES = (0.01, 0.05, 0.1, 0.2)  # unknown-accept rates of the trade-off table evaluate prints


@dataclass
class StoredScores:
    """The scores of a stored episode set's queries, flattened over episodes: known queries (N, way) with their
    labels, and unknown-class queries (M, way) when asked for."""

    known: np.ndarray
    labels: np.ndarray
    unknown: np.ndarray | None
    episodes: int


def stored_scores(trained: TrainedModel, data: FewShotData, split: str, shape: EpisodeShape, episodes: int | None,
                  with_unknowns: bool) -> StoredScores:
    """Score the first ``episodes`` stored episodes of ``shape`` (all by default), their unknown-class queries too
    when ``with_unknowns``, which are scored like the others against the episode's support set."""
    method = trained.method
    if with_unknowns and getattr(method, "transductive", False):
        raise FsltoolError(f"method {trained.config['method']!r} normalises each episode's queries together (transductive), "
                           "so unknown-class queries would change the known ones' scores; open-set evaluation needs a "
                           "non-transductive method")
    support, query = (indices[:episodes] for indices in data.stored_episodes(split, shape))
    known_width = query.shape[1]
    if with_unknowns:
        query = np.concatenate([query, stored_unknowns(data, split, shape)[: len(query)]], axis=1)
    with autocast_for(trained.recipe.precision, device_of(method)):  # as the run validated and evaluates
        scores = episode_scores(method, data, shape, support, query).double().numpy()
    labels = np.tile(episode_labels(shape)[1].numpy(), len(support))
    unknown = scores[:, known_width:].reshape(-1, shape.way) if with_unknowns else None
    return StoredScores(scores[:, :known_width].reshape(-1, shape.way), labels, unknown, len(support))


def calibration_file(trained: TrainedModel) -> Path:
    """RUN/calibration.json of the run a checkpoint (RUN/checkpoints/NAME.pt) belongs to."""
    if trained.path.parent.name != "checkpoints":
        raise FsltoolError(f"{trained.path}: a calibration is kept in a run folder; give the run folder, not a loose checkpoint")
    return trained.path.parent.parent / CALIBRATION_FILE


def fitted_calibration_file(trained: TrainedModel) -> Path | None:
    """RUN/calibration.json when the run has one (unread), None otherwise (or for a loose checkpoint)."""
    path = calibration_file(trained) if trained.path.parent.name == "checkpoints" else None
    return path if path is not None and path.is_file() else None


def load_calibration(trained: TrainedModel) -> Calibration | None:
    """The run's calibration if it has one (None otherwise), refused when fitted to other weights than these."""
    path = fitted_calibration_file(trained)
    if path is None:
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FsltoolError(f"{path}: unreadable ({error})") from None
    if payload.get("format") != FORMAT:
        raise FsltoolError(f"{path}: not an fsltool calibration (format {payload.get('format')!r}, expected {FORMAT!r})")
    fitted = payload.get("model", {})
    if fitted.get("digest") != model_digest(trained):
        raise FsltoolError(f"{path}: fitted on other weights ({fitted.get('checkpoint')}) than {trained.path} holds now; "
                           f"fit it again: fsltool calibrate {path.parent} --checkpoint {trained.path.stem}")
    return Calibration.from_json(payload, str(path))


def require_calibration(trained: TrainedModel) -> Calibration:
    calibration = load_calibration(trained)
    if calibration is None:
        run = trained.path.parent.parent
        raise FsltoolError(f"{run}: no calibration (no {CALIBRATION_FILE}); fit one first: fsltool calibrate {run}")
    return calibration


def calibration_metadata(trained: TrainedModel) -> dict[str, Any]:
    """The ``calibration`` entry export and enrolment add to their metadata, when the run has one."""
    calibration = load_calibration(trained)
    return {} if calibration is None else {"calibration": calibration.to_json()}


def calibration_left_out(trained: TrainedModel) -> str | None:
    """Why the run's calibration is not carried into its exported or enrolled graph: that graph computes other
    scores than the method's own (``Method.exported_scores``: MAML's and Reptile's body prototypes), and a
    temperature and a threshold fitted on the method's scores would mislead on them. None when it is carried or the
    run has none."""
    other_scores = trained.method.exported_scores
    path = fitted_calibration_file(trained) if other_scores is not None else None
    return None if path is None else (f"{path} not carried: it was fitted on the method's own scores, but this graph computes "
                                      f"{other_scores}; predict gives an uncalibrated softmax and no open-set threshold")


def carried_calibration(trained: TrainedModel) -> dict[str, Any]:
    """The metadata entry ``calibration`` when the exported or enrolled graph computes the scores it was fitted on;
    otherwise none, and a ``calibration_left_out`` note when the run has one."""
    if trained.method.exported_scores is None:
        return calibration_metadata(trained)
    note = calibration_left_out(trained)
    return {} if note is None else {"calibration_left_out": note}


def probability_metrics(scores: StoredScores, temperature: float) -> dict[str, float]:
    """NLL and ECE of the known queries' probabilities at temperature 1 (the raw softmax) and at ``temperature``."""
    def at(t: float) -> dict[str, float]:
        probabilities = softmax(scores.known, t)
        return {"nll": negative_log_likelihood(probabilities, scores.labels),
                "ece": expected_calibration_error(probabilities, scores.labels)}

    return {"temperature": temperature, "ece_bins": ECE_BINS, "queries": len(scores.labels), "before": at(1.0), "after": at(temperature)}


def rejection_rates(scores: StoredScores, temperature: float, score: str, threshold: float) -> dict[str, float]:
    """At one threshold: unknown queries accepted, known queries rejected, accuracy on the accepted known ones, and
    open-set accuracy (a known query right when accepted with its class, an unknown one right when rejected)."""
    assert scores.unknown is not None
    confidence = OPEN_SET_SCORES[score]
    known_accepted = confidence(scores.known, temperature) > threshold
    unknown_accepted = confidence(scores.unknown, temperature) > threshold
    correct = scores.known.argmax(-1) == scores.labels
    right = (correct & known_accepted).sum() + (~unknown_accepted).sum()
    return {
        "threshold": threshold,
        "unknown_accepted": float(unknown_accepted.mean()),
        "known_rejected": float(1 - known_accepted.mean()),
        "accuracy_accepted": float(correct[known_accepted].mean()) if known_accepted.any() else float("nan"),
        "open_set_accuracy": float(right / (len(correct) + len(unknown_accepted))),
    }


def open_set_metrics(scores: StoredScores, calibration: Calibration | None) -> dict[str, Any]:
    """AUROC of known against unknown queries by each open-set score; the rates at the run's stored threshold (fitted
    on validation) and at thresholds that accept TRADE_OFF_RATES of these unknown queries (the trade-off curve)."""
    assert scores.unknown is not None
    temperature = calibration.temperature if calibration is not None else 1.0
    stored = calibration.open_set if calibration is not None else None
    score = stored.score if stored is not None else DEFAULT_OPEN_SET_SCORE
    curve = [{"target_unknown_accepted": rate, **rejection_rates(scores, temperature, score, fit_threshold(
        OPEN_SET_SCORES[score](scores.unknown, temperature), rate))} for rate in TRADE_OFF_RATES]
    return {
        "temperature": temperature,
        "known_queries": len(scores.labels),
        "unknown_queries": len(scores.unknown),
        "accuracy": float((scores.known.argmax(-1) == scores.labels).mean()),
        "auroc": {name: auroc(f(scores.known, temperature), f(scores.unknown, temperature)) for name, f in OPEN_SET_SCORES.items()},
        "score": score,
        "stored_threshold": None if stored is None else {"false_accept_rate": stored.false_accept_rate,
                                                          **rejection_rates(scores, temperature, score, stored.threshold)},
        "trade_off": curve,
    }


def confidence_report(trained: TrainedModel, data: FewShotData, split: str, shape: EpisodeShape, episodes: int | None, *,
                      calibration: bool, open_set: bool) -> dict[str, Any]:
    """What ``evaluate --calibration`` (NLL and ECE before and after the run's temperature; the run must have been
    calibrated) and ``--open-set`` (AUROC and the trade-off, at the run's temperature if it has one) report on the
    stored episodes, scored once."""
    fitted = require_calibration(trained) if calibration else load_calibration(trained)
    scores = stored_scores(trained, data, split, shape, episodes, with_unknowns=open_set)
    report: dict[str, Any] = {}
    if calibration:
        assert fitted is not None
        report["calibration"] = probability_metrics(scores, fitted.temperature)
    if open_set:
        report["open_set"] = open_set_metrics(scores, fitted)
    return report


@dataclass
class CalibrationFit:
    path: Path
    calibration: Calibration
    record: dict[str, Any]  # what calibration.json holds besides the calibration: provenance and validation figures


def calibrate(
    trained: TrainedModel,
    data: FewShotData,
    shape: EpisodeShape,
    *,
    episodes: int | None = None,
    reject_rate: float | None = None,
    open_set_score: str = DEFAULT_OPEN_SET_SCORE,
) -> CalibrationFit:
    """Fit the temperature on the stored validation episodes of ``shape`` (and, with ``reject_rate``, the open-set
    threshold that accepts that fraction of their unknown-class queries) and write RUN/calibration.json."""
    if reject_rate is not None:
        check_rate(reject_rate)
    if open_set_score not in OPEN_SET_SCORES:
        raise FsltoolError(f"--open-set-score {open_set_score!r}: expected one of {', '.join(OPEN_SET_SCORES)}")
    path = calibration_file(trained)
    scores = stored_scores(trained, data, "val", shape, episodes, with_unknowns=reject_rate is not None)
    temperature = fit_temperature(scores.known, scores.labels)
    threshold, open_set = None, None
    if reject_rate is not None:
        assert scores.unknown is not None
        threshold = OpenSetThreshold(open_set_score, fit_threshold(
            OPEN_SET_SCORES[open_set_score](scores.unknown, temperature), reject_rate), reject_rate)
        open_set = {"unknown_queries": len(scores.unknown),
                    **rejection_rates(scores, temperature, open_set_score, threshold.threshold)}
    calibration = Calibration(temperature, threshold)
    record = {
        "format": FORMAT,
        "model": {"checkpoint": str(trained.path), "digest": model_digest(trained)},
        "fitted_on": {"data": data.path, "split": "val", "shape": str(shape), "episodes": scores.episodes},
        "validation": {**probability_metrics(scores, temperature), "open_set": open_set},
    }
    payload = {**record, **calibration.to_json()}
    atomic_write(path, lambda file: file.write((json.dumps(payload, indent=2) + "\n").encode()))
    return CalibrationFit(path, calibration, record)
