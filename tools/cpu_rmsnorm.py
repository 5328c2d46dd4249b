"""
A faster RMSNorm for eager fp32 CPU training: the same function as F.rms_norm, which runs there as a chain of
small ops. The training script and the benchmark switch it on for a model on CPU; stable_gpt's RMSNorm and
SDDNorm stay plain F.rms_norm, so that each copies on its own.

    use_rmsnorm_kernel(model)                      # every RMSNorm and SDDNorm of model, on CPU in eager fp32
    use_rmsnorm_kernel(model, layer_norm_kernel)   # timing only, wrong math: RMSNorm as fast as LayerNorm
"""

import torch
import torch.nn.functional as F

from stable_gpt import RMSNorm, SDDNorm


class RMSNormCPU(torch.autograd.Function):
    """RMSNorm whose backward reuses LayerNorm's fused kernel: given mean 0 and RMSNorm's rstd, LayerNorm's
    input gradient, rstd * (g - mean(g) - y * mean(g * y)) with g = grad_out * weight and y = x * rstd, is
    RMSNorm's except for the -mean(g) term (LayerNorm's mean subtraction), which is added back.
    Forward+backward at (32, 64, 512), keep_freed_memory on: F.rms_norm 4.0 ms, this 1.6-1.75 ms, F.layer_norm
    0.9-1.0 ms (docs/speed.md)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])  # mean(x^2): (..., 1)
        rstd = ms.add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        # LayerNorm's backward kernel (the one F.layer_norm's autograd calls), told the mean is 0 and the
        # rstd is RMSNorm's: gradients for x and weight, none for a bias
        grad_x, grad_w, _ = torch.ops.aten.native_layer_norm_backward(
            grad_out.contiguous(), x.contiguous(), [d], torch.zeros_like(rstd), rstd, weight, None,
            [True, True, False])
        mean_g = torch.linalg.vecdot(grad_out, weight).unsqueeze_(-1).div_(d)  # (..., 1)
        return grad_x.add_(mean_g.mul_(rstd)), grad_w, None


def layer_norm_kernel(x, weight, eps):
    """A timing experiment with the wrong math (bench --rmsnorm-as-layernorm): PyTorch's fused LayerNorm of the
    same size, to bound what a faster RMSNorm kernel could buy."""
    return F.layer_norm(x, weight.shape, weight, None, eps)


class _KernelForward:
    """The forward of an RMSNorm or SDDNorm that calls self.kernel(x, weight, eps) in eager fp32 CPU (F.rms_norm,
    the class's own forward, elsewhere: on GPU and under torch.compile F.rms_norm is fused)."""

    def forward(self, x):
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
            return super().forward(x)
        y = self.kernel(x, self.weight, self.eps)
        return y if getattr(self, "bias", None) is None else y + self.bias


class _RMSNormWithKernel(_KernelForward, RMSNorm):
    pass


class _SDDNormWithKernel(_KernelForward, SDDNorm):
    pass


WITH_KERNEL = {RMSNorm: _RMSNormWithKernel, SDDNorm: _SDDNormWithKernel,
               _RMSNormWithKernel: _RMSNormWithKernel, _SDDNormWithKernel: _SDDNormWithKernel}


def use_rmsnorm_kernel(model, kernel=RMSNormCPU.apply):
    """Every RMSNorm and SDDNorm of model computes through kernel in eager fp32 CPU. Parameters, state dict and
    isinstance checks are unchanged (each module's class becomes a subclass of its own). Returns model."""
    for module in model.modules():
        if type(module) in WITH_KERNEL:
            module.__class__ = WITH_KERNEL[type(module)]
            module.kernel = kernel
    return model
