"""A batched primal-dual interior-point solver for the quadratic programs of MetaOptNet's SVM head,

    minimise 1/2 z^T Q z + p^T z   subject to   z <= h,  A z = b   (Q positive definite),

differentiable by the implicit function theorem at the point it returns.

The iteration is qpth's (Amos & Kolter 2017, OptNet), the solver MetaOptNet's code calls, so that a run with its
iteration counts (15 in training, 3 at test) computes what theirs did: a start from the KKT system with unit
scaling, slacks and multipliers shifted to at least 1 where one is negative, Mehrotra predictor-corrector steps
(centring sigma = (the affine step's complementarity / the current one)^3, the step 0.999 of the way to the
boundary), and the iterate with the smallest residual returned. ``iterations`` is qpth's ``maxIter``: the residuals
of that many points (the start and the iterates after it) are compared, and a problem stops early when its residual
has not improved for 3 iterations. The backward pass is qpth's too: one KKT solve at the returned point, whether or
not it has converged. Two departures, both from qpth's batching: each problem of a batch is solved as qpth solves
it alone (qpth stops a batch when no problem in it improves, and its step rule reads the whole batch), and a
direction component that is exactly 0 does not limit the step (qpth's rule divides by it)."""

from __future__ import annotations

from typing import NamedTuple

import torch

STALL_LIMIT = 3  # qpth's notImprovedLim: stop a problem after this many iterations without a smaller residual
TOLERANCE = 1e-12  # qpth's eps: stop a problem whose residual is below it
STEP_FRACTION = 0.999  # of the way to the boundary


class Iterate(NamedTuple):
    """A point of the interior-point method: the solution ``z``, the inequality slacks ``s`` (h - z at
    feasibility), their multipliers ``lam`` and the equality multipliers ``nu``; each (batch, size)."""

    z: torch.Tensor
    s: torch.Tensor
    lam: torch.Tensor
    nu: torch.Tensor


def kkt_factor(hessian: torch.Tensor, scaling: torch.Tensor, equality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LU factors of the reduced KKT matrix [[Q + diag(d), A^T], [A, 0]], d = multipliers / slacks."""
    batch, n, m = scaling.shape[0], scaling.shape[1], equality.shape[-2]
    equality = equality.expand(batch, m, n)
    top = torch.cat([hessian + torch.diag_embed(scaling), equality.transpose(1, 2)], 2)
    bottom = torch.cat([equality, scaling.new_zeros(batch, m, m)], 2)
    return torch.linalg.lu_factor(torch.cat([top, bottom], 1))


def kkt_solve(factor: tuple[torch.Tensor, torch.Tensor], scaling: torch.Tensor, rx: torch.Tensor, rs: torch.Tensor,
              rz: torch.Tensor, ry: torch.Tensor) -> Iterate:
    """The Newton direction of the KKT system with residuals (rx, rs, rz, ry):
    Q dz + dlam + A^T dnu = -rx,  d * ds + dlam = -rs,  dz + ds = -rz,  A dz = -ry;
    the slack and multiplier directions are eliminated, leaving the factored (n + m) system."""
    n = scaling.shape[1]
    rhs = torch.cat([-rx + rs - scaling * rz, -ry], 1)
    solution = torch.linalg.lu_solve(*factor, rhs.unsqueeze(2)).squeeze(2)
    dz, dnu = solution[:, :n], solution[:, n:]
    ds = -rz - dz
    return Iterate(dz, ds, -rs - scaling * ds, dnu)


def step_to_boundary(value: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """(batch,) the largest step keeping ``value + step * direction`` nonnegative where it falls, and where
    nothing falls, the larger of 1 and the row's largest such ratio (qpth's rule, per problem)."""
    ratio = -value / direction
    falling = direction < 0
    unlimited = torch.where(falling, ratio, torch.full_like(ratio, -torch.inf)).amax(1, keepdim=True).clamp(min=1.0)
    return torch.where(falling, ratio, unlimited).amin(1)


def starting_point(hessian: torch.Tensor, linear: torch.Tensor, upper: torch.Tensor, equality: torch.Tensor,
                   rhs: torch.Tensor) -> Iterate:
    """qpth's start: the KKT system with unit scaling solved for the problem's data, then the slacks and
    multipliers of each problem moved up by 1 - their minimum where that minimum is negative."""
    ones = torch.ones_like(linear)
    start = kkt_solve(kkt_factor(hessian, ones, equality), ones, linear, torch.zeros_like(linear), -upper, -rhs)

    def at_least_one(v: torch.Tensor) -> torch.Tensor:
        lowest = v.amin(1, keepdim=True)
        return torch.where(lowest < 0, v + 1 - lowest, v)

    return start._replace(s=at_least_one(start.s), lam=at_least_one(start.lam))


def residuals(hessian: torch.Tensor, linear: torch.Tensor, upper: torch.Tensor, equality: torch.Tensor, rhs: torch.Tensor,
              point: Iterate) -> tuple[Iterate, torch.Tensor, torch.Tensor]:
    """The KKT residuals (rx, rs, rz, ry) at ``point``, the complementarity mu = |s . lam| / n and qpth's merit:
    |equality residual| + |inequality residual| + |stationarity residual| + n mu."""
    z, s, lam, nu = point
    rx = (hessian @ z.unsqueeze(2)).squeeze(2) + lam + (nu.unsqueeze(1) @ equality).squeeze(1) + linear
    rz = z + s - upper
    ry = (equality @ z.unsqueeze(2)).squeeze(2) - rhs
    mu = (s * lam).sum(1).abs() / z.shape[1]
    merit = ry.norm(dim=1) + rz.norm(dim=1) + rx.norm(dim=1) + z.shape[1] * mu
    return Iterate(rx, lam, rz, ry), mu, merit


def predictor_corrector(hessian: torch.Tensor, equality: torch.Tensor, point: Iterate, residual: Iterate,
                        mu: torch.Tensor) -> tuple[Iterate, torch.Tensor]:
    """One Mehrotra step from ``point``: the direction and the step length (batch,)."""
    scaling = point.lam / point.s
    factor = kkt_factor(hessian, scaling, equality)
    affine = kkt_solve(factor, scaling, *residual)
    reach = torch.minimum(step_to_boundary(point.lam, affine.lam), step_to_boundary(point.s, affine.s)).clamp(max=1.0)
    reached = ((point.s + reach[:, None] * affine.s) * (point.lam + reach[:, None] * affine.lam)).sum(1)
    sigma = (reached / (point.s * point.lam).sum(1)) ** 3
    zeros = torch.zeros_like(point.z)
    centring = kkt_solve(factor, scaling, zeros, ((-mu * sigma)[:, None] + affine.s * affine.lam) / point.s, zeros,
                         torch.zeros_like(point.nu))
    direction = Iterate(*(a + c for a, c in zip(affine, centring)))
    step = (STEP_FRACTION * torch.minimum(step_to_boundary(point.lam, direction.lam),
                                          step_to_boundary(point.s, direction.s))).clamp(max=1.0)
    return direction, step


def solve_qp(hessian: torch.Tensor, linear: torch.Tensor, upper: torch.Tensor, equality: torch.Tensor, rhs: torch.Tensor,
             iterations: int) -> Iterate:
    """The best of ``iterations`` interior-point iterates of each problem (no gradient: see ``qp_solution``).
    (batch, n, n), (batch, n), (batch, n), (batch or 1, m, n), (batch, m)."""
    point = best = starting_point(hessian, linear, upper, equality, rhs)
    best_merit = torch.full_like(linear[:, 0], torch.inf)  # the start's merit is the first best
    running = torch.ones(linear.shape[0], dtype=torch.bool, device=linear.device)
    stalled = torch.zeros(linear.shape[0], dtype=torch.long, device=linear.device)
    for iteration in range(iterations):
        residual, mu, merit = residuals(hessian, linear, upper, equality, rhs, point)
        improved = running & (merit < best_merit)
        best = Iterate(*(torch.where(improved[:, None], new, old) for new, old in zip(point, best)))
        best_merit = torch.where(improved, merit, best_merit)
        stalled = torch.where(improved, 0, stalled + 1)
        running = running & (stalled < STALL_LIMIT) & (best_merit >= TOLERANCE) & ~(mu > 1e32)
        if iteration == iterations - 1:
            break
        direction, step = predictor_corrector(hessian, equality, point, residual, mu)
        step = torch.where(running, step, 0.0)[:, None]
        point = Iterate(*(v + step * dv for v, dv in zip(point, direction)))
    return best


class _QPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hessian: torch.Tensor, linear: torch.Tensor, upper: torch.Tensor, equality: torch.Tensor,
                rhs: torch.Tensor, iterations: int) -> torch.Tensor:
        solution = solve_qp(hessian, linear, upper, equality, rhs, iterations)
        ctx.save_for_backward(hessian, equality, *solution)
        return solution.z

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """qpth's backward: the KKT system at the returned point (multipliers and slacks clamped at 1e-8) solved
        for the incoming gradient gives the gradients of every input."""
        hessian, equality, z, s, lam, nu = ctx.saved_tensors
        scaling = lam.clamp(min=1e-8) / s.clamp(min=1e-8)
        zeros = torch.zeros_like(z)
        with torch.autocast(z.device.type, enabled=False):  # in the solve's dtype, as the forward
            d = kkt_solve(kkt_factor(hessian, scaling, equality), scaling, grad_z, zeros, zeros, torch.zeros_like(nu))
        outer = d.z.unsqueeze(2) * z.unsqueeze(1)
        grad_hessian = 0.5 * (outer + outer.transpose(1, 2))
        grad_equality = None
        if ctx.needs_input_grad[3]:
            grad_equality = d.nu.unsqueeze(2) * z.unsqueeze(1) + nu.unsqueeze(2) * d.z.unsqueeze(1)
            grad_equality = grad_equality.sum(0, keepdim=True) if equality.shape[0] == 1 else grad_equality
        return grad_hessian, d.z, -d.lam, grad_equality, -d.nu, None


def qp_solution(hessian: torch.Tensor, linear: torch.Tensor, upper: torch.Tensor, equality: torch.Tensor,
                rhs: torch.Tensor, iterations: int) -> torch.Tensor:
    """(batch, n) the solution of each problem after at most ``iterations`` iterations, differentiable in every
    tensor argument (qpth's implicit gradients at the returned point)."""
    return _QPFunction.apply(hessian, linear, upper, equality, rhs, iterations)
