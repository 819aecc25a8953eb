"""Logistic regression on each episode's support set, RFS's classifier (Tian, Wang, Krishnan, Tenenbaum and Isola,
"Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?", ECCV 2020): a frozen embedding,
L2-normalised, and a multinomial logistic regression fitted on the support embeddings, as their ``eval/meta_eval.py``
calls scikit-learn's ``LogisticRegression(penalty='l2', C=1.0, multi_class='multinomial')``: the cross-entropy summed
over the support images times C, plus half the squared norm of the weights, the intercepts unpenalised.

The fit is the optimum, not a number of steps: the optimal weights lie in the span of the support features (the
penalty is their norm and the loss sees them only through the features), so each episode is solved in an
orthonormal basis of its support features (a QR factorisation: at most S numbers per class instead of D), by
Newton's method with a backtracking line search (each Newton system solved by conjugate gradients on Hessian-vector
products, the Hessian never formed), in float64, every episode of a call at once, until the gradient's largest
entry is below ``tolerance``. scikit-learn's lbfgs stops earlier (tol 1e-4), so its weights differ from the
optimum in the last digits; the predictions are those of the optimum. RFS also fits on 5 augmented copies of each
support image (``n_aug_support_samples``); here the support images are used as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fsltool.data.episodes import Episode
from fsltool.errors import FsltoolError
from fsltool.methods.base import (
    ExportGraph, Method, StepOutput, TaskShare, class_onehot, register_method, require_bool, require_number, require_positive_int,
)
from fsltool.models.backbones import Backbone

ARMIJO = 1e-4  # the line search's sufficient decrease
HALVINGS = 40  # the line search gives up on a step after this many halvings (the gradient is then ~0 anyway)


def penalised_loss(c: float, weights: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each episode's objective: C x the summed cross-entropy + |weights|^2 / 2. (E, way, K), (E, way), (E, S, K),
    (E, S, way) one-hot -> (E,)."""
    scores = features @ weights.transpose(1, 2) + bias.unsqueeze(1)
    return c * (torch.logsumexp(scores, -1) - (scores * targets).sum(-1)).sum(-1) + 0.5 * weights.pow(2).sum((1, 2))


def fit_logistic(features: torch.Tensor, targets: torch.Tensor, c: float, tolerance: float, max_iterations: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal (weights (E, way, D), intercepts (E, way)) of each episode, float64, from (E, S, D) features and
    (E, S, way) one-hot targets."""
    x, y = features.double(), targets.double()
    basis, triangle = torch.linalg.qr(x.transpose(1, 2))  # x^T = basis @ triangle, basis (E, D, K) orthonormal
    z = triangle.transpose(1, 2)  # (E, S, K): the features' coordinates in the basis
    episodes, support, way = y.shape
    k = z.shape[-1]
    u = torch.cat([z, z.new_ones(episodes, support, 1)], -1)  # (E, S, K + 1): coordinates and the intercept's 1
    theta = x.new_zeros(episodes, way, k + 1)  # each class's weights (in the basis) and its intercept

    def objective(params: torch.Tensor) -> torch.Tensor:
        return penalised_loss(c, params[..., :k], params[..., k], z, y)

    for _ in range(max_iterations):
        probabilities = (u @ theta.transpose(1, 2)).softmax(-1)  # (E, S, way)
        gradient = (c * (probabilities - y)).transpose(1, 2) @ u  # (E, way, K + 1)
        gradient[..., :k] += theta[..., :k]
        size = gradient.flatten(1).norm(dim=1)
        if gradient.abs().amax() < tolerance:
            return theta[..., :k] @ basis.transpose(1, 2), theta[..., k]
        direction = conjugate_gradients(lambda v: _hessian_times(v, u, probabilities, c, k), gradient,
                                        (size * size.clamp(max=0.5)).clamp(min=tolerance / 10), way * (k + 1))
        theta = _line_search(objective, theta, direction, (gradient * direction).sum((1, 2)))
    raise FsltoolError(f"method 'logistic': the fit did not reach a gradient below {tolerance:g} in {max_iterations} "
                       "Newton steps; raise method_options.max_iterations or tolerance")


def _hessian_times(v: torch.Tensor, u: torch.Tensor, probabilities: torch.Tensor, c: float, k: int) -> torch.Tensor:
    """The objective's Hessian times (E, way, K + 1) directions, never formed: C sum_i (diag(p_i) - p_i p_i^T)
    (x) u_i u_i^T, plus the penalty's identity on the weights, plus curvature along the intercepts' shared shift:
    adding one number to every intercept changes no softmax, so the Hessian is singular along it; that term makes
    it definite without moving the optimum (the gradient has no part along the shift)."""
    scores = u @ v.transpose(1, 2)  # (E, S, way)
    curved = probabilities * (scores - (probabilities * scores).sum(-1, keepdim=True))
    product = c * curved.transpose(1, 2) @ u
    product[..., :k] += v[..., :k]
    product[..., k] += v[..., k].mean(-1, keepdim=True)
    return product


def conjugate_gradients(multiply: Callable[[torch.Tensor], torch.Tensor], right: torch.Tensor, residual_goal: torch.Tensor,
                        iterations: int) -> torch.Tensor:
    """x with multiply(x) = right for each episode's symmetric positive definite operator, by conjugate gradients
    until the residual's norm is below that episode's ``residual_goal`` (E,) or ``iterations`` (exact in at most the
    dimension in exact arithmetic). ``right``: (E, ...)."""
    solution = torch.zeros_like(right)
    residual = right.clone()
    search = residual.clone()
    squared = residual.pow(2).flatten(1).sum(1)
    shape = (-1,) + (1,) * (right.dim() - 1)
    for _ in range(iterations):
        active = squared.sqrt() > residual_goal
        if not active.any():
            break
        product = multiply(search)
        curvature = (search * product).flatten(1).sum(1)
        step = torch.where(active, squared / curvature.clamp_min(torch.finfo(right.dtype).tiny), torch.zeros_like(squared))
        solution += step.view(shape) * search
        residual -= step.view(shape) * product
        new_squared = residual.pow(2).flatten(1).sum(1)
        search = residual + torch.where(active, new_squared / squared.clamp_min(torch.finfo(right.dtype).tiny),
                                        torch.zeros_like(squared)).view(shape) * search
        squared = new_squared
    return solution


def _line_search(objective: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, direction: torch.Tensor,
                 slope: torch.Tensor) -> torch.Tensor:
    """theta - t * direction with each episode's largest t in 1, 1/2, 1/4, ... that decreases its objective enough."""
    before, step = objective(theta), torch.ones_like(slope)
    rounding = 16 * torch.finfo(theta.dtype).eps * before.abs()  # near the optimum the decrease is below the objective's rounding
    pending = torch.ones_like(slope, dtype=torch.bool)
    result = theta.clone()
    for _ in range(HALVINGS):
        trial = theta - step.view(-1, 1, 1) * direction
        accepted = pending & (objective(trial) <= before - ARMIJO * step * slope + rounding)
        result[accepted] = trial[accepted]
        pending &= ~accepted
        if not pending.any():
            break
        step = torch.where(pending, step / 2, step)
    return result


@register_method("logistic")
class LogisticRegression(Method):
    """A frozen embedding and a multinomial logistic regression fitted on each episode's support set (RFS).

    Options: ``c``, the inverse of the penalty's strength (scikit-learn's C; RFS: 1); ``normalize``, the features
    divided by their norm first (RFS: true); ``tolerance`` on the gradient's largest entry and ``max_iterations`` of
    Newton's method."""

    embeds_independently = True
    takes_support_copies = True
    meta_trainable = False

    def __init__(self, backbone: Backbone, c: float = 1.0, normalize: bool = True, tolerance: float = 1e-9,
                 max_iterations: int = 100) -> None:
        super().__init__(backbone)
        require_number(self.name, "c", c, lambda v: v > 0, "a positive number")
        require_bool(self.name, "normalize", normalize)
        require_number(self.name, "tolerance", tolerance, lambda v: v > 0, "a positive number")
        require_positive_int(self.name, "max_iterations", max_iterations)
        self.c, self.normalize, self.tolerance, self.max_iterations = float(c), normalize, float(tolerance), max_iterations

    def features(self, embeddings: torch.Tensor) -> torch.Tensor:
        flat = embeddings.flatten(2)
        return F.normalize(flat, dim=-1) if self.normalize else flat

    def scores_from_embeddings(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, way: int | torch.Tensor
    ) -> torch.Tensor:
        """The fitted regression's scores (logits) of each query: (E, S, ...), (E, S), (E, Q, ...) -> (E, Q, way)."""
        targets = class_onehot(support_labels, int(way), torch.float64)
        weights, bias = fit_logistic(self.features(support), targets, self.c, self.tolerance, self.max_iterations)
        scores = self.features(query).double() @ weights.transpose(1, 2) + bias.unsqueeze(1)
        return scores.to(query.dtype)

    def step(self, episode: Episode) -> StepOutput:
        raise self.not_meta_trained()

    def meta_step(self, episodes: list[Episode], share: TaskShare | None = None) -> list[StepOutput]:
        raise self.not_meta_trained()

    def not_meta_trained(self) -> FsltoolError:
        return FsltoolError(f"method {self.name!r} is not meta-trained: it fits a classifier on each episode over a backbone "
                            "from `fsltool pretrain` (evaluate RUN --method logistic); meta-train protonet instead")

    def export_graphs(self, example: Episode) -> dict[str, ExportGraph]:
        raise FsltoolError(f"method {self.name!r} cannot be exported: it solves a logistic regression on each episode's "
                           "support set, which is not one fixed graph; export the backbone under protonet instead")
