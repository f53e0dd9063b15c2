"""Smoke test of an installed slimtune wheel (CPU build), run from outside the source tree:
the package and its extension come from the environment, one op of each pillar matches the
reference, forward and backward."""

import os
import sys
import sysconfig

import torch

import slimtune
from slimtune import reference


def close(actual, expected, what):
    # float32 sums in another order than the reference: a few ulps of the largest entries.
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")
    print(f"ok: {what}")


def main() -> int:
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    where = os.path.realpath(os.path.dirname(slimtune.__file__))
    print("slimtune from", where)
    assert where == os.path.join(site, "slimtune"), f"slimtune imported from {where}, not from the wheel in {site}"
    assert not slimtune.has_cuda(), "a CPU build reports CUDA kernels"
    assert slimtune.build_info()["cuda"] is False
    torch.manual_seed(0)

    # sparse-delta fine-tuning: forward and the SDDMM gradient of the values
    layer = slimtune.nn.SparseDeltaLinear(torch.nn.Linear(48, 24), density=0.1)
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(5, 48)
    y = layer(x)
    y.square().sum().backward()
    v = layer.values.detach().clone().requires_grad_(True)
    y_ref = reference.sparse_delta_linear(x, layer.base.weight, layer.base.bias, layer.indices, v)
    y_ref.square().sum().backward()
    close(y, y_ref, "sparse_delta_linear forward")
    close(layer.values.grad, v.grad, "sparse_delta_linear grad(values)")

    # fused LoRA: forward and gradients of both adapters
    w, b = torch.randn(24, 48), torch.randn(24)
    a = torch.randn(4, 48, requires_grad=True)
    bb = torch.randn(24, 4, requires_grad=True)
    out = slimtune.lora.lora_linear(x, w, b, a, bb, 0.5)
    ga, gb = torch.autograd.grad(out.square().sum(), (a, bb))
    out_ref = reference.lora_linear(x, w, b, a, bb, 0.5)
    ga_ref, gb_ref = torch.autograd.grad(out_ref.square().sum(), (a, bb))
    close(out, out_ref, "lora_linear forward")
    close(ga, ga_ref, "lora_linear grad(A)")
    close(gb, gb_ref, "lora_linear grad(B)")

    # memsave: ReLU output and its bit mask in one pass, gradient from the mask
    z = torch.randn(3, 37)
    relu_out, mask = torch.ops.slimtune.memsave_relu(z)
    close(relu_out, torch.relu(z), "memsave_relu output")
    assert torch.equal(mask, reference.memsave_relu_mask(z)), "memsave_relu mask differs from the reference"
    print("ok: memsave_relu mask")
    g = torch.randn(3, 37)
    close(torch.ops.slimtune.memsave_relu_backward(g, mask), g * (z > 0), "memsave_relu_backward")
    print("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
