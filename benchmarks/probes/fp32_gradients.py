"""Why precision "fp32" gradients of f are 1e-4..1e-3 from fp64 on a GPU (issue 11's notes).

The width-512 f (batch 128) in fp32 against the same f in fp64, gradients with respect to the
state and the first conv's weight, with cuDNN's fp32 mode as f sets it ("as is"), set to IEEE or
to TF32 before the backward pass (f's backward resets it to its own: "after" shows what is left),
with cuDNN off (PyTorch's own convolutions), and GroupNorm's backward alone.

    python benchmarks/probes/fp32_gradients.py      # GPU only; results/h100-2026-11-24/fp32_gradients.txt
"""
import copy

import torch

from nodekd_ray.models import ODEFunc

dev = torch.device("cuda")
conv = torch.backends.cudnn.conv
torch.manual_seed(0)
f = ODEFunc(512, precision="fp32").to(dev)
ref = copy.deepcopy(f).double()
h = torch.randn(128, 512, 8, 8, device=dev, dtype=torch.float64)
cot = torch.randn_like(h)
t = torch.tensor(0.3, device=dev, dtype=torch.float64)


def grads(m, dt):
    hh = h.to(dt).requires_grad_()
    return torch.autograd.grad(m(t.to(dt), hh), [hh, m.convs[0].weight], cot.to(dt))


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


r = grads(ref, torch.float64)
for label, pre in (("as is", None), ("global ieee", "ieee"), ("global tf32", "tf32")):
    if pre:
        conv.fp32_precision = pre
    gh, gw = grads(f, torch.float32)
    print(f"{label:<12} after={conv.fp32_precision} dh {rel(gh, r[0]):.2e} dW {rel(gw, r[1]):.2e}")
conv.fp32_precision = "ieee"
torch.backends.cudnn.enabled = False
gh, gw = grads(f, torch.float32)
print(f"no cudnn     dh {rel(gh, r[0]):.2e} dW {rel(gw, r[1]):.2e}")
torch.backends.cudnn.enabled = True
torch.backends.cuda.matmul.fp32_precision = "ieee"
gh, gw = grads(f, torch.float32)
print(f"ieee+matmul  dh {rel(gh, r[0]):.2e} dW {rel(gw, r[1]):.2e}")
gn = torch.nn.GroupNorm(32, 512).to(dev).double()
g2 = torch.randn(128, 512, 8, 8, device=dev, dtype=torch.float64)
x = h.clone().requires_grad_()
a = torch.autograd.grad(gn(x), x, g2)[0]
xf = h.float().requires_grad_()
b = torch.autograd.grad(copy.deepcopy(gn).float()(xf), xf, g2.float())[0]
print(f"groupnorm alone dx {rel(b, a):.2e}")
