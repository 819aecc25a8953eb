"""fsltool's `svm` head (fsltool.methods.svm, its own interior-point solver) against MetaOptNet's
MetaOptNetHead_SVM_CS as their code solves it, with qpth's QPFunction: the dual coefficients, the query predictions and
the gradient of a query loss with respect to the support and query features, episode by episode (as their test.py
solves), at their iteration counts (3 at test, 15 in training), in float32 (theirs) and float64; and each solver's
float32 coefficients against the same iterations in float64 (how much of a difference is rounding), and how far
those float64 iterates are from the optimum (40 iterations). Also: how far
qpth's batched solve of 8 episodes (their training meta-batch; stopping shared by the batch) is from solving each
alone (fsltool's semantics). Features: ReLU'd class centres plus noise, at two scales of norm.

qpth is not a dependency of fsltool (it needs cvxpy and numpy < 2): run this from an environment that has both,
e.g. `python -m venv /tmp/qpv && /tmp/qpv/bin/pip install torch==2.13.0 qpth`, then
`PYTHONPATH=. /tmp/qpv/bin/python scripts/check_svm_against_qpth.py --json results/svm_vs_qpth.json`."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time

import torch
from qpth.qp import QPFunction

from fsltool.methods.svm import svm_dual

COST, RIDGE = 0.1, 1.0
DIFFERENCES = ("dual", "gradient_support", "gradient_query")  # fsltool against qpth


def qpth_dual(support: torch.Tensor, labels: torch.Tensor, way: int, iterations: int) -> torch.Tensor:
    """MetaOptNetHead_SVM_CS's QP, built as their code builds it (Kronecker products, G = I), solved by qpth."""
    episodes, shots, dtype = support.shape[0], support.shape[1], support.dtype
    gram = support @ support.transpose(1, 2)
    hessian = torch.stack([torch.kron(k, torch.eye(way, dtype=dtype)) for k in gram]) + torch.eye(shots * way, dtype=dtype)
    onehot = torch.nn.functional.one_hot(labels, way).to(dtype).reshape(episodes, shots * way)
    equality = torch.kron(torch.eye(shots, dtype=dtype), torch.ones(1, way, dtype=dtype)).expand(episodes, -1, -1)
    inequality = torch.eye(shots * way, dtype=dtype).expand(episodes, -1, -1)
    solution = QPFunction(verbose=-1, maxIter=iterations)(hessian, -onehot, inequality, COST * onehot, equality,
                                                           torch.zeros(episodes, shots, dtype=dtype))
    return solution.reshape(episodes, shots, way)


def episode(generator: torch.Generator, way: int, shot: int, dim: int, norm: float) -> tuple[torch.Tensor, ...]:
    centres = torch.randn(way, dim, generator=generator, dtype=torch.float64)
    support = torch.relu(centres.repeat_interleave(shot, 0) + torch.randn(way * shot, dim, generator=generator, dtype=torch.float64))
    query = torch.relu(centres.repeat_interleave(15, 0) + torch.randn(way * 15, dim, generator=generator, dtype=torch.float64))
    factor = norm / support.norm(dim=1).mean()
    return support * factor, query * factor, torch.arange(way).repeat_interleave(shot)


def scores_and_gradients(solve, support: torch.Tensor, query: torch.Tensor, labels: torch.Tensor, way: int) -> tuple[torch.Tensor, ...]:
    support, query = support.clone().requires_grad_(True), query.clone().requires_grad_(True)
    alpha = solve(support[None], labels[None])
    scores = (query @ support.T) @ alpha[0]
    loss = torch.nn.functional.cross_entropy(scores, torch.arange(way).repeat_interleave(15))
    grad_support, grad_query = torch.autograd.grad(loss, (support, query))
    return alpha[0].detach(), scores.detach(), grad_support, grad_query


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def compare(way: int, shot: int, iterations: int, dtype: torch.dtype, norm: float, episodes: int, dim: int) -> dict:
    generator = torch.Generator().manual_seed(way * 100 + shot * 10 + iterations)
    worst = dict.fromkeys(("dual", "gradient_support", "gradient_query", "fsltool_dual_error_vs_float64",
                           "qpth_dual_error_vs_float64", "float64_dual_error_vs_optimum"), 0.0)
    agree = total = 0
    ours_s = theirs_s = 0.0
    for _ in range(episodes):
        support, query, labels = (t.to(dtype) if t.is_floating_point() else t for t in episode(generator, way, shot, dim, norm))
        start = time.perf_counter()
        ours = scores_and_gradients(lambda s, y: svm_dual(s, y, way, COST, RIDGE, iterations), support, query, labels, way)
        ours_s += time.perf_counter() - start
        start = time.perf_counter()
        theirs = scores_and_gradients(lambda s, y: qpth_dual(s, y, way, iterations), support, query, labels, way)
        theirs_s += time.perf_counter() - start
        exact = svm_dual(support[None].double(), labels[None], way, COST, RIDGE, iterations)[0]  # the same iterates, float64
        optimum = svm_dual(support[None].double(), labels[None], way, COST, RIDGE, 40)[0]
        measured = {"dual": relative(ours[0], theirs[0]), "gradient_support": relative(ours[2], theirs[2]),
                    "gradient_query": relative(ours[3], theirs[3]), "fsltool_dual_error_vs_float64": relative(ours[0], exact),
                    "qpth_dual_error_vs_float64": relative(theirs[0], exact),
                    "float64_dual_error_vs_optimum": relative(exact, optimum)}
        worst = {key: max(worst[key], measured[key]) for key in worst}
        agree += int((ours[1].argmax(1) == theirs[1].argmax(1)).sum())
        total += len(labels) // shot * 15
    return {"shape": f"{way}w{shot}s15q", "iterations": iterations, "dtype": str(dtype).removeprefix("torch."),
            "feature_norm": norm, "episodes": episodes, "dim": dim,
            **{f"max_relative_{key}" + ("_difference" if key in DIFFERENCES else ""): value for key, value in worst.items()},
            "prediction_agreement": agree / total, "fsltool_s": ours_s, "qpth_s": theirs_s}


def batch_coupling(way: int, shot: int, dtype: torch.dtype, norm: float, dim: int) -> dict:
    """qpth on 8 episodes at once (their training meta-batch, 15 iterations) against qpth on each alone."""
    generator = torch.Generator().manual_seed(7)
    support, _, labels = zip(*(episode(generator, way, shot, dim, norm) for _ in range(8)))
    support = torch.stack(support).to(dtype)
    labels = torch.stack(labels)
    together = qpth_dual(support, labels, way, 15)
    alone = torch.cat([qpth_dual(support[i : i + 1], labels[i : i + 1], way, 15) for i in range(8)])
    return {"shape": f"{way}w{shot}s", "dtype": str(dtype).removeprefix("torch."), "feature_norm": norm,
            "max_relative_dual_difference_batch_of_8_vs_alone": relative(together, alone)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows, coupling = [], []
    for dtype in (torch.float32, torch.float64):
        for norm in (1.0, 30.0):
            for way, shot, iterations in ((5, 1, 3), (5, 5, 3), (5, 15, 15), (5, 5, 15)):
                rows.append(compare(way, shot, iterations, dtype, norm, args.episodes, args.dim))
                print(json.dumps(rows[-1]))
            coupling.append(batch_coupling(5, 15, dtype, norm, args.dim))
            print(json.dumps(coupling[-1]))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": "scripts/check_svm_against_qpth.py", "qpth": importlib.metadata.version("qpth"), "torch": torch.__version__,
                       "rows": rows, "qpth_batch_coupling": coupling}, out, indent=2)


if __name__ == "__main__":
    main()
