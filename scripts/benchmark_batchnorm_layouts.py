"""BatchNorm's backward and double backward, as MAML's inner loop differentiates it: native batch_norm on NCHW
and on channels-last maps, and a custom autograd function whose backward is written in differentiable ops.

    .venv/bin/python scripts/benchmark_batchnorm_layouts.py [--threads 2]

Maps of 5 x 512 x 14 x 14 (a 5-image support batch of 8 tasks of 64 channels, grouped as fsltool's per-task
networks run them); each case: forward, a loss, its gradient with create_graph, then the gradient of a function
of that gradient. Prints milliseconds per case (median of 20 after a warm-up) and checks that every case gives the
native NCHW gradients in float64.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


class DifferentiableBackwardBatchNorm(torch.autograd.Function):
    """Batch-statistics BatchNorm whose backward recomputes the statistics from the saved input with ordinary
    (differentiable) ops, so the double backward goes through them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return torch.addcmul(bias[:, None, None], x - mean[:, None, None], (torch.rsqrt(var + eps) * weight)[:, None, None])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
        rstd = torch.rsqrt(var + ctx.eps)
        normalized = (x - mean[:, None, None]) * rstd[:, None, None]
        grad_bias, grad_weight = grad.sum((0, 2, 3)), (grad * normalized).sum((0, 2, 3))
        count = x.numel() // x.shape[1]
        grad_x = (weight * rstd)[:, None, None] * (grad - (grad_bias / count)[:, None, None] - normalized * (grad_weight / count)[:, None, None])
        return grad_x, grad_weight, grad_bias, None


def native(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)


def custom(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return DifferentiableBackwardBatchNorm.apply(x, weight, bias, 1e-5)


def second_order(norm: Callable[..., torch.Tensor], x0: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, probe: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x, weight, bias = (t.clone().requires_grad_() for t in (x0, w0, b0))
    y = norm(x, weight, bias)
    grads = torch.autograd.grad((y * y.detach().sin()).sum() + y.square().sum(), (x, weight, bias), create_graph=True)
    return torch.autograd.grad((grads[0] * probe).sum() + 3 * grads[1].sum() + grads[2].square().sum(), (x, weight, bias))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 512, 14, 14, generator=generator, dtype=torch.float64)
    weight, bias = torch.rand(512, generator=generator, dtype=torch.float64) + 0.5, torch.randn(512, generator=generator, dtype=torch.float64)
    probe = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    reference = second_order(native, x, weight, bias, probe)
    for name, norm, layout in (("native, NCHW", native, torch.contiguous_format), ("native, channels_last", native, torch.channels_last),
                               ("custom backward, NCHW", custom, torch.contiguous_format)):
        inputs = x.contiguous(memory_format=layout)
        difference = max((a - b).abs().max().item() for a, b in zip(second_order(norm, inputs, weight, bias, probe), reference))
        inputs32, args32 = inputs.float(), (weight.float(), bias.float(), probe.float().contiguous(memory_format=layout))
        times = []
        for repeat in range(21):
            began = time.perf_counter()
            second_order(norm, inputs32, *args32)
            if repeat:
                times.append(time.perf_counter() - began)
        print(f"{name:24s} {1000 * statistics.median(times):7.1f} ms   float64 difference from native NCHW {difference:.1e}")


if __name__ == "__main__":
    main()
