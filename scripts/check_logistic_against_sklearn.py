"""fsltool's `logistic` fit against scikit-learn's LogisticRegression as RFS calls it (penalty l2, C=1, lbfgs,
max_iter 1000, multinomial), on random unit-norm episodes: largest weight and intercept differences and prediction
agreement on queries. scikit-learn is not a dependency of fsltool: run this from an environment that has both,
e.g. `python -m venv /tmp/skv && /tmp/skv/bin/pip install scikit-learn torch==2.13.0`, then
`PYTHONPATH=. /tmp/skv/bin/python scripts/check_logistic_against_sklearn.py --json results/logistic_vs_sklearn.json`."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from fsltool.methods.logistic import fit_logistic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for way, shot in ((5, 1), (5, 5), (20, 5)):
        generator = torch.Generator().manual_seed(way * 10 + shot)
        worst_weight = worst_bias = 0.0
        agree = total = 0
        ours_s = theirs_s = 0.0
        for _ in range(args.episodes):
            centres = torch.randn(way, args.dim, generator=generator, dtype=torch.float64)
            support = F.normalize(centres.repeat_interleave(shot, 0) + 2 * torch.randn(way * shot, args.dim, generator=generator, dtype=torch.float64), dim=-1)
            query = F.normalize(centres.repeat_interleave(15, 0) + 2 * torch.randn(way * 15, args.dim, generator=generator, dtype=torch.float64), dim=-1)
            labels = torch.arange(way).repeat_interleave(shot)
            start = time.perf_counter()
            weights, bias = fit_logistic(support[None], F.one_hot(labels, way).double()[None], 1.0, 1e-9, 100)
            ours_s += time.perf_counter() - start
            start = time.perf_counter()
            reference = LogisticRegression(penalty="l2", C=1.0, solver="lbfgs", max_iter=1000).fit(support.numpy(), labels.numpy())
            theirs_s += time.perf_counter() - start
            worst_weight = max(worst_weight, float(np.abs(weights[0].numpy() - reference.coef_).max()))
            centred = bias[0].numpy() - bias[0].numpy().mean()
            worst_bias = max(worst_bias, float(np.abs(centred - (reference.intercept_ - reference.intercept_.mean())).max()))
            ours = (query @ weights[0].T + bias[0]).argmax(-1).numpy()
            agree += int((ours == reference.predict(query.numpy())).sum())
            total += len(ours)
        rows.append({"shape": f"{way}w{shot}s15q", "episodes": args.episodes, "dim": args.dim,
                     "max_abs_weight_difference": worst_weight, "max_abs_centred_intercept_difference": worst_bias,
                     "prediction_agreement": agree / total, "fsltool_s": ours_s, "sklearn_s": theirs_s})
        print(json.dumps(rows[-1]))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": "scripts/check_logistic_against_sklearn.py", "sklearn": __import__("sklearn").__version__,
                       "torch": torch.__version__, "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()
