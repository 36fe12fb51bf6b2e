"""GroupNorm (+ ReLU) in one Triton kernel forward and one backward: ``NODEConfig.norm_impl == "triton"``.

Why: on an H100 (README, "Measured on one H100"), f's GroupNorm took about 21 ms of an 80 ms
training step's GPU time, at 67 us forward and 106 us backward per call on a 4 MB state, far below
the memory bandwidth; under bf16 autocast a further 21 ms went to dtype copies, since CUDA's autocast
runs group_norm in fp32 and so casts each conv's bf16 output up before the norm and the ReLU's
output down before the next conv. torch.compile's fusion of the pair was slower (launch-bound).

Here one program normalises one (sample, group): at the paper's width a group is 16 channels of the
8 x 8 state, 1024 values, held in registers. The forward reads x in its own dtype (the conv's bf16
output, or the fp32 state), adds the previous conv's time term t * response in fp32 when given one
(``time``; ODEFunc's aligned time conv), computes the group's mean and variance in fp32 (two passes
over the registers, not E[x^2] - E[x]^2), applies gamma and beta in fp32 and the ReLU, and writes
the output once, in the dtype the next conv runs in: the autocast dtype under autocast, else x's.
So there is no cast kernel around the norm, no multiply and add for the time term, and unlike
``bf16_norms`` the statistics and the affine stay fp32. The backward recomputes x + t * response,
the normalised values and the ReLU's mask from x and the saved per-group mean and 1/std (2 floats
per group), so nothing else is kept: autograd would keep GroupNorm's input and the ReLU's output.
dgamma and dbeta are summed per sample in the kernel and over the batch by one torch reduction.

Both memory formats are read through their strides (NCHW and channels-last); a group larger than
``MAX_GROUP`` values falls back to PyTorch's ops (never the case in f at the paper's shapes).

On a CPU the kernels run only in Triton's interpreter, and only when TRITON_INTERPRET=1 asks for
it (tests/test_fused_norm.py): it is slow and meant for checking the kernels, not for training.
Otherwise CPU tensors take PyTorch's ops with the same arithmetic, so that a student trained with
the kernels can be evaluated and attacked on a CPU; training one there is refused (train_student).
"""
from __future__ import annotations

import collections
import contextlib
import os

import torch
import torch.nn.functional as F

MAX_GROUP = 16384   # values per (sample, group) held by one program
LAUNCHES = collections.Counter()   # kernel launches, "forward" and "backward" (benchmarks/bench_norm.py counts them)


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


_KERNELS: dict = {}


def _kernels(interpret: bool):
    """(forward, backward) kernels, jit-compiled for CUDA or wrapped for Triton's interpreter."""
    if interpret in _KERNELS:
        return _KERNELS[interpret]
    import triton
    import triton.language as tl

    def gn_fwd(x_ptr, y_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, t_ptr, r_ptr,
               sxn, sxc, sxs, syn, syc, sys_, src, srs, G, HW, eps,
               CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, RELU: tl.constexpr,
               HAS_T: tl.constexpr):
        pid = tl.program_id(0)
        n = (pid // G).to(tl.int64)
        g = pid % G
        ci = tl.arange(0, BLOCK_C)
        si = tl.arange(0, BLOCK_S)
        cm = ci < CG
        mask = cm[:, None] & (si < HW)[None, :]
        c = g * CG + ci
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + si[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        if HAS_T:   # the previous conv's time term: x + t * response, response (1, C, H, W)
            r = tl.load(r_ptr + c[:, None] * src + si[None, :] * srs, mask=mask, other=0.0).to(tl.float32)
            x = x + tl.load(t_ptr).to(tl.float32) * r
        count = CG * HW
        mean = tl.reduce(tl.reduce(x, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine) / count
        d = tl.where(mask, x - mean, 0.0)
        var = tl.reduce(tl.reduce(d * d, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine) / count
        rstd = 1.0 / tl.sqrt(var + eps)
        gam = tl.load(gamma_ptr + c, mask=cm, other=0.0).to(tl.float32)
        bet = tl.load(beta_ptr + c, mask=cm, other=0.0).to(tl.float32)
        y = (d * rstd) * gam[:, None] + bet[:, None]
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + n * syn + c[:, None] * syc + si[None, :] * sys_, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)

    def gn_bwd(dz_ptr, x_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, t_ptr, r_ptr, dx_ptr, dgamma_ptr, dbeta_ptr,
               szn, szc, szs, sxn, sxc, sxs, src, srs, sdn, sdc, sds, G, C, HW,
               CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, RELU: tl.constexpr,
               HAS_T: tl.constexpr):
        pid = tl.program_id(0)
        n = (pid // G).to(tl.int64)
        g = pid % G
        ci = tl.arange(0, BLOCK_C)
        si = tl.arange(0, BLOCK_S)
        cm = ci < CG
        mask = cm[:, None] & (si < HW)[None, :]
        c = g * CG + ci
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + si[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        if HAS_T:
            r = tl.load(r_ptr + c[:, None] * src + si[None, :] * srs, mask=mask, other=0.0).to(tl.float32)
            x = x + tl.load(t_ptr).to(tl.float32) * r
        dz = tl.load(dz_ptr + n * szn + c[:, None] * szc + si[None, :] * szs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + pid)
        rstd = tl.load(rstd_ptr + pid)
        gam = tl.load(gamma_ptr + c, mask=cm, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean, 0.0)
        xhat = d * rstd
        if RELU:   # the forward's ReLU mask, from the same expression the forward computed
            bet = tl.load(beta_ptr + c, mask=cm, other=0.0).to(tl.float32)
            y = xhat * gam[:, None] + bet[:, None]
            dy = tl.where(y > 0.0, dz, 0.0)
        else:
            dy = dz
        tl.store(dgamma_ptr + n * C + c, tl.reduce(dy * xhat, 1, tl.standard._sum_combine), mask=cm)
        tl.store(dbeta_ptr + n * C + c, tl.reduce(dy, 1, tl.standard._sum_combine), mask=cm)
        dxhat = dy * gam[:, None]
        count = CG * HW
        m1 = tl.reduce(tl.reduce(dxhat, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine) / count
        m2 = tl.reduce(tl.reduce(dxhat * xhat, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine) / count
        dx = rstd * (dxhat - m1 - xhat * m2)
        tl.store(dx_ptr + n * sdn + c[:, None] * sdc + si[None, :] * sds, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    # Sums are written tl.reduce(..., tl.standard._sum_combine), which is what tl.sum does: tl.sum is itself
    # a jit function, fixed as compiled or interpreted when triton is first imported, while these kernels
    # choose per call (the interpreter takes its fast numpy path for _sum_combine).
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        wrap = InterpretedFunction
    else:
        wrap = triton.jit
    _KERNELS[interpret] = (wrap(gn_fwd), wrap(gn_bwd))
    return _KERNELS[interpret]


def _strides(t: torch.Tensor):
    """(sample, channel, flattened-pixel) strides: H and W flatten into one index in both memory formats."""
    return t.stride(0), t.stride(1), t.stride(3)


def _on(x: torch.Tensor):
    """Triton launches on the current CUDA device, not on the tensors' (cuda:1 from `--device cuda:1`)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _time_args(x, tv, r):
    """(t_ptr, r_ptr): the time term's tensors, or x twice as unused placeholders."""
    return (x, x) if r is None else (tv, r)


def _time_strides(r):
    """The response's (channel, flattened-pixel) strides; it is broadcast over the batch."""
    return (0, 0) if r is None else (r.stride(1), r.stride(3))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == t.shape[3] * t.stride(3) else t.contiguous()


# Launches ask for FMA contraction (enable_fp_fusion, Triton's default up to 3.9) explicitly: the forward's
# output and the backward's ReLU mask are then the same fma(xhat, gamma, beta), rounded alike.
def _launch_args(x: torch.Tensor, groups: int):
    import triton
    n, c, h, w = x.shape
    cg = c // groups
    return not x.is_cuda, (n * groups,), dict(CG=cg, BLOCK_C=triton.next_power_of_2(cg),
                                              BLOCK_S=triton.next_power_of_2(h * w))


class _GroupNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, tv, r, groups: int, eps: float, relu: bool, out_dtype):
        x = _flat(x)
        if r is not None:
            r = _flat(r)
        interpret, grid, meta = _launch_args(x, groups)
        fwd, _ = _kernels(interpret)
        y = torch.empty_like(x, dtype=out_dtype)     # x's strides (x is dense): NCHW or channels-last
        mean = torch.empty(grid[0], dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        LAUNCHES["forward"] += 1
        with _on(x):
            fwd[grid](x, y, gamma, beta, mean, rstd, *_time_args(x, tv, r), *_strides(x), *_strides(y),
                      *_time_strides(r), groups, x.shape[2] * x.shape[3], float(eps), RELU=relu, HAS_T=r is not None,
                      enable_fp_fusion=True, **meta)
        ctx.save_for_backward(x, gamma, beta, mean, rstd, tv, r)
        ctx.groups, ctx.relu = groups, relu
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        x, gamma, beta, mean, rstd, tv, r = ctx.saved_tensors
        dz = _flat(dz)
        interpret, grid, meta = _launch_args(x, ctx.groups)
        _, bwd = _kernels(interpret)
        n, c = x.shape[:2]
        dx = torch.empty_like(x)
        partial = torch.empty(2, n, c, dtype=torch.float32, device=x.device)   # per sample: dgamma, dbeta
        dgamma, dbeta = partial[0], partial[1]
        LAUNCHES["backward"] += 1
        with _on(x):
            bwd[grid](dz, x, gamma, beta, mean, rstd, *_time_args(x, tv, r), dx, dgamma, dbeta, *_strides(dz),
                      *_strides(x), *_time_strides(r), *_strides(dx), ctx.groups, c, x.shape[2] * x.shape[3],
                      RELU=ctx.relu, HAS_T=r is not None, enable_fp_fusion=True, **meta)
        need_x, need_gamma, need_beta, need_t, need_r = ctx.needs_input_grad[:5]
        dgamma, dbeta = partial.sum(1).to(gamma.dtype) if need_gamma or need_beta else (None, None)
        # the time term's gradients, as autograd's add and mul would give them: the response's summed over
        # the batch (in fp32, from dx), t's over everything
        dt = (dx.float() * r).sum().to(tv.dtype) if need_t else None
        dr = (dx.sum(0, keepdim=True, dtype=torch.float32) * tv.float()).to(r.dtype) if need_r else None
        return (dx if need_x else None, dgamma if need_gamma else None, dbeta if need_beta else None,
                dt, dr, None, None, None, None)


def group_norm_act(x: torch.Tensor, groups: int, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                   relu: bool = True, out_dtype: torch.dtype | None = None, time=None) -> torch.Tensor:
    """relu(group_norm(x)) (or group_norm(x) with relu False) with fp32 statistics and affine, written in
    out_dtype: by default the autocast dtype under autocast, else x's dtype.

    time: None, or (t, response) with t a 0-d tensor and response (1, C, H, W): the norm is then of
    x + t * response, added in fp32 inside the kernel (f's time term, models.ODEFunc._aligned_weights):
    no separate multiply and add over the state, and x + t * response is never stored."""
    if out_dtype is None:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    n, c, h, w = x.shape
    if c % groups or (c // groups) * h * w > MAX_GROUP or not (x.is_cuda or interpreting()):
        # PyTorch's ops with the kernels' arithmetic (fp32 statistics and affine): groups too large for
        # one program, and CPU tensors outside the interpreter (an attack or evaluation of a student
        # trained with norm_impl "triton" on a CPU; train_student refuses to train one there)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float() if time is None else x.float() + time[0].float() * time[1].float()
            y = F.group_norm(xf, groups, gamma.float(), beta.float(), eps)
            return (F.relu(y) if relu else y).to(out_dtype)
    tv, r = (None, None) if time is None else time
    return _GroupNormAct.apply(x, gamma, beta, tv, r, groups, eps, relu, out_dtype)


def gn_relu(h, groups: int, gamma, beta, eps: float):
    """ODEFunc's GroupNorm + ReLU (models._gn_relu's signature) through the fused kernels."""
    return group_norm_act(h, groups, gamma, beta, eps, relu=True)
