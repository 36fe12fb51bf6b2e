"""GroupNorm (+ ReLU) in one Triton kernel forward and one backward: ``NODEConfig.norm_impl == "triton"``.

Why: on an H100 (README, "Measured on one H100"), f's GroupNorm took about 21 ms of an 80 ms
training step's GPU time, at 67 us forward and 106 us backward per call on a 4 MB state, far below
the memory bandwidth; under bf16 autocast a further 21 ms went to dtype copies, since CUDA's autocast
runs group_norm in fp32 and so casts each conv's bf16 output up before the norm and the ReLU's
output down before the next conv. torch.compile's fusion of the pair was slower (launch-bound).

Here one program normalises one (sample, group): at the paper's width a group is 16 channels of the
8 x 8 state, 1024 values, held in registers. The forward reads x in its own dtype (the conv's bf16
output, or the fp32 state), adds the previous conv's bias and time term t * response in fp32 when
given them (``bias``, ``time``; ODEFunc's aligned time conv, whose conv then runs without its bias),
computes the group's mean and variance in fp32 (two passes
over the registers, not E[x^2] - E[x]^2), applies gamma and beta in fp32 and the ReLU, and writes
the output once, in the dtype the next conv runs in: the autocast dtype under autocast, else x's.
So there is no cast kernel around the norm, no multiply and add for the time term, and the
statistics and the affine stay fp32. The backward recomputes x + t * response,
the normalised values and the ReLU's mask from x and the saved per-group mean and 1/std (2 floats
per group), so nothing else is kept: autograd would keep GroupNorm's input and the ReLU's output.
The parameters' gradients are summed per sample in the kernel; within a solve they are also summed
over the solve's evaluations in place, and handed to autograd once (SolveGrads).

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

    def gn_fwd(x_ptr, y_ptr, gamma_ptr, beta_ptr, bias_ptr, mean_ptr, rstd_ptr, t_ptr, r_ptr,
               sxn, sxc, sxs, syn, syc, sys_, src, srs, G, HW, eps,
               CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, RELU: tl.constexpr,
               HAS_B: tl.constexpr, HAS_T: tl.constexpr):
        pid = tl.program_id(0)
        n = (pid // G).to(tl.int64)
        g = pid % G
        ci = tl.arange(0, BLOCK_C)
        si = tl.arange(0, BLOCK_S)
        cm = ci < CG
        mask = cm[:, None] & (si < HW)[None, :]
        c = g * CG + ci
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + si[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:   # the previous conv's bias
            x = x + tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)[:, None]
        if HAS_T:   # the previous conv's time term: x + t * response, response (1, C, H, W)
            r = tl.load(r_ptr + c[:, None] * src + si[None, :] * srs, mask=mask, other=0.0).to(tl.float32)
            x = x + tl.load(t_ptr).to(tl.float32) * r
        x = tl.where(mask, x, 0.0)
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

    def gn_bwd(dz_ptr, x_ptr, gamma_ptr, beta_ptr, bias_ptr, mean_ptr, rstd_ptr, t_ptr, r_ptr, dx_ptr, part_ptr,
               racc_ptr, szn, szc, szs, sxn, sxc, sxs, src, srs, sdn, sdc, sds, G, N, C, HW,
               CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, RELU: tl.constexpr,
               HAS_B: tl.constexpr, HAS_T: tl.constexpr, ACC: tl.constexpr):
        pid = tl.program_id(0)
        n = (pid // G).to(tl.int64)
        g = pid % G
        ci = tl.arange(0, BLOCK_C)
        si = tl.arange(0, BLOCK_S)
        cm = ci < CG
        mask = cm[:, None] & (si < HW)[None, :]
        c = g * CG + ci
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + si[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            x = x + tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)[:, None]
        if HAS_T:
            r = tl.load(r_ptr + c[:, None] * src + si[None, :] * srs, mask=mask, other=0.0).to(tl.float32)
            tv = tl.load(t_ptr).to(tl.float32)
            x = x + tv * r
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
        dy = tl.where(mask, dy, 0.0)
        dxhat = dy * gam[:, None]
        count = CG * HW
        m1 = tl.reduce(tl.reduce(dxhat, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine) / count
        m2 = tl.reduce(tl.reduce(dxhat * xhat, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine) / count
        dx = tl.where(mask, rstd * (dxhat - m1 - xhat * m2), 0.0)
        tl.store(dx_ptr + n * sdn + c[:, None] * sdc + si[None, :] * sds, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        # per-sample parameter gradients, rows of part (3, N, C): gamma, beta, the previous conv's bias.
        # ACC: added to a solve's running sums (SolveGrads); each (sample, channel) belongs to one program
        pg = part_ptr + n * C + c
        dgamma = tl.reduce(dy * xhat, 1, tl.standard._sum_combine)
        dbeta = tl.reduce(dy, 1, tl.standard._sum_combine)
        if ACC:
            dgamma += tl.load(pg, mask=cm, other=0.0)
            dbeta += tl.load(pg + N * C, mask=cm, other=0.0)
        tl.store(pg, dgamma, mask=cm)
        tl.store(pg + N * C, dbeta, mask=cm)
        if HAS_B:
            dbias = tl.reduce(dx, 1, tl.standard._sum_combine)
            if ACC:
                dbias += tl.load(pg + 2 * N * C, mask=cm, other=0.0)
            tl.store(pg + 2 * N * C, dbias, mask=cm)
        if ACC and HAS_T:   # the response's gradient, t * dx, summed over the solve per sample: (N, C, HW)
            pr = racc_ptr + n * C * HW + c[:, None] * HW + si[None, :]
            tl.store(pr, tl.load(pr, mask=mask, other=0.0) + tv * dx, mask=mask)

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


class SolveGrads:
    """A solve's running sums of one norm's parameter gradients (``group_norm_act(..., acc=...)``).

    Within a solve every evaluation of f uses the same gamma, beta, bias and time response, and plain
    autograd hands each evaluation's gradient for them back separately: a reduction over the batch and an
    add into the running gradient, per parameter and per evaluation (about 25 small kernels per evaluation
    of f). Here the backward kernel adds each evaluation's per-sample gradients into these buffers in
    place, and ``proxies`` delivers the totals to autograd once, when the solve's backward pass is done
    with them: one reduction per buffer per solve. Each (sample, channel) belongs to one program of the
    kernel, so the in-place adds need no atomics and are deterministic.

    part (3, N, C) fp32: gamma, beta and bias gradients per sample; resp (N, C, H*W) fp32: the response's
    gradient per sample (t * dx, summed over the solve), when the norm adds a time term.
    """

    def __init__(self, n: int, c: int, hw: int, time: bool, device):
        self.part = torch.zeros(3, n, c, dtype=torch.float32, device=device)
        self.resp = torch.zeros(n, c, hw, dtype=torch.float32, device=device) if time else None

    def proxies(self, gamma, beta, bias=None, response=None):
        """(gamma, beta, bias, response) as seen by this solve's evaluations (bias and response may be None)."""
        tensors = [t for t in (gamma, beta, bias, response) if t is not None]
        out = iter(_Deliver.apply(self, *tensors))
        return tuple(next(out) if t is not None else None for t in (gamma, beta, bias, response))


class _Deliver(torch.autograd.Function):
    """Views of a solve's norm parameters whose backward hands over SolveGrads' sums (plus whatever else
    reached the views), then clears the sums, so that a second backward pass through the graph sums afresh."""

    @staticmethod
    def forward(ctx, acc, *tensors):
        ctx.acc = acc
        ctx.like = [(t.shape, t.dtype) for t in tensors]
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        acc = ctx.acc
        sums = acc.part.sum(1)                          # (3, C): gamma, beta, bias
        totals = [sums[0], sums[1], sums[2]][:min(len(grads), 3)]
        if len(grads) == 4:
            totals.append(acc.resp.sum(0))              # (C, H*W): the response's
        out = []
        for total, g, (shape, dtype) in zip(totals, grads, ctx.like):
            total = total.reshape(shape)
            out.append((total if g is None else total + g.float()).to(dtype))
        acc.part.zero_()
        if acc.resp is not None:
            acc.resp.zero_()
        return (None, *out)


class _GroupNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, bias, tv, r, acc, groups: int, eps: float, relu: bool, out_dtype):
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
            fwd[grid](x, y, gamma, beta, x if bias is None else bias, mean, rstd, *_time_args(x, tv, r),
                      *_strides(x), *_strides(y), *_time_strides(r), groups, x.shape[2] * x.shape[3], float(eps),
                      RELU=relu, HAS_B=bias is not None, HAS_T=r is not None, enable_fp_fusion=True, **meta)
        ctx.save_for_backward(x, gamma, beta, bias, mean, rstd, tv, r)
        ctx.groups, ctx.relu, ctx.acc = groups, relu, acc
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        x, gamma, beta, bias, mean, rstd, tv, r = ctx.saved_tensors
        acc = ctx.acc
        dz = _flat(dz)
        interpret, grid, meta = _launch_args(x, ctx.groups)
        _, bwd = _kernels(interpret)
        n, c = x.shape[:2]
        dx = torch.empty_like(x)
        part = acc.part if acc is not None else torch.empty(3, n, c, dtype=torch.float32, device=x.device)
        racc = acc.resp if acc is not None and acc.resp is not None else x
        LAUNCHES["backward"] += 1
        with _on(x):
            bwd[grid](dz, x, gamma, beta, x if bias is None else bias, mean, rstd, *_time_args(x, tv, r), dx, part,
                      racc, *_strides(dz), *_strides(x), *_time_strides(r), *_strides(dx), ctx.groups, n, c,
                      x.shape[2] * x.shape[3], RELU=ctx.relu, HAS_B=bias is not None, HAS_T=r is not None,
                      ACC=acc is not None, enable_fp_fusion=True, **meta)
        need_x, need_gamma, need_beta, need_bias, need_t, need_r = ctx.needs_input_grad[:6]
        # t's gradient (only the adjoint method asks for it) from dx, as autograd's add and mul would give it
        dt = (dx.float() * r).sum().to(tv.dtype) if need_t else None
        if acc is not None:   # the parameters' gradients are in acc's sums, delivered once per solve
            return dx if need_x else None, None, None, None, dt, None, None, None, None, None, None
        sums = part.sum(1) if need_gamma or need_beta or need_bias else (None, None, None)
        # the response's gradient: dx summed over the batch (in fp32) times t
        dr = (dx.sum(0, keepdim=True, dtype=torch.float32) * tv.float()).to(r.dtype) if need_r else None
        return (dx if need_x else None, sums[0].to(gamma.dtype) if need_gamma else None,
                sums[1].to(beta.dtype) if need_beta else None, sums[2].to(bias.dtype) if need_bias else None,
                dt, dr, None, None, None, None, None)


def kernels_apply(x: torch.Tensor, groups: int) -> bool:
    """Whether group_norm_act runs the kernels on x (else PyTorch's ops, which ignore ``acc``)."""
    n, c, h, w = x.shape
    return not (c % groups or (c // groups) * h * w > MAX_GROUP) and (x.is_cuda or interpreting())


def group_norm_act(x: torch.Tensor, groups: int, gamma: torch.Tensor, beta: torch.Tensor, eps: float,
                   relu: bool = True, out_dtype: torch.dtype | None = None, time=None, bias=None,
                   acc: SolveGrads | None = None) -> torch.Tensor:
    """relu(group_norm(x)) (or group_norm(x) with relu False) with fp32 statistics and affine, written in
    out_dtype: by default the autocast dtype under autocast, else x's dtype.

    The norm is of x + bias + t * response, added in fp32 inside the kernel, where given: bias (C,) and
    time = (t, response), t a 0-d tensor and response (1, C, H, W). These are the previous conv's bias and
    time term (models.ODEFunc's aligned time conv): the conv then runs without its bias, there is no
    separate add or multiply over the state, and the sum is never stored.

    acc: a SolveGrads whose proxies gamma, beta, bias and response are: their gradients are then summed
    into it instead of being returned per call."""
    if out_dtype is None:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if not kernels_apply(x, groups):
        # PyTorch's ops with the kernels' arithmetic (fp32 statistics and affine): groups too large for
        # one program, and CPU tensors outside the interpreter (an attack or evaluation of a student
        # trained with norm_impl "triton" on a CPU; train_student refuses to train one there)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            if bias is not None:
                xf = xf + bias.float()[:, None, None]
            if time is not None:
                xf = xf + time[0].float() * time[1].float()
            y = F.group_norm(xf, groups, gamma.float(), beta.float(), eps)
            return (F.relu(y) if relu else y).to(out_dtype)
    tv, r = (None, None) if time is None else time
    return _GroupNormAct.apply(x, gamma, beta, bias, tv, r, acc, groups, eps, relu, out_dtype)


def gn_relu(h, groups: int, gamma, beta, eps: float):
    """ODEFunc's GroupNorm + ReLU (models._gn_relu's signature) through the fused kernels."""
    return group_norm_act(h, groups, gamma, beta, eps, relu=True)


# ----------------------------------------------------------------------------- f's fused path


def fused_layers(func, h: torch.Tensor, tv):
    """ODEFunc's layers on the fused path (norm_impl "triton", the aligned time conv, no recompute): returns the
    last conv's output and the group_norm_act arguments the final norm still needs (its bias and time term, and
    the final norm's parameters as "params"). func: the ODEFunc; tv: the time value its channel carries.

    Each conv's bias and time term t * response are added inside the next norm's kernel, in fp32 and to the fp32
    response: the conv runs without its bias, and there is no multiply or add over the state per layer. Within a
    solve, the norms' parameter gradients (gamma, beta, the previous conv's bias and response) are summed by the
    kernels over the solve's evaluations and handed to autograd once (SolveGrads). In a CUDA graph with a solve's
    shared inputs (func.graph_inputs, cuda_graphs.GraphSolveInputs), the same sums go to that solve's fixed
    buffers, the convs read its prepared weights and add their weight gradients into its buffers too
    (cuda_graphs.ConvInto), and GraphSolveInputs hands every sum to autograd once."""
    shared = func.graph_inputs
    solve = shared is None and func._solve_cache is not None and torch.is_grad_enabled() and \
        (h.is_cuda or interpreting())
    bias = response = None
    for i in range(len(func.norms) + 1):
        norm = func.norms[i] if i < len(func.norms) else func.norm_out
        gamma, beta, acc = norm.weight, norm.bias, None
        if solve:
            acc, (gamma, beta, bias, response) = _solve_grads(func, i, norm, bias, response, h)
        elif shared is not None:
            acc = shared.sums[i]
        kw = dict(time=None if response is None else (tv, response), bias=bias, acc=acc)
        if i == len(func.norms):
            return h, dict(kw, params=(gamma, beta))
        a = group_norm_act(h, norm.num_groups, gamma, beta, norm.eps, **kw)
        conv = func.convs[i]
        bias = conv.bias
        if shared is not None:
            from .cuda_graphs import ConvInto

            response = shared.responses[i]
            h = ConvInto.apply(a, shared.weights[i], shared.weight_grads[i])
            continue
        w, response = func._aligned_weights(i, conv, h, low_response=False)
        h = F.conv2d(a, w, None, 1, 1)


def _solve_grads(func, i: int, norm, bias, response, h: torch.Tensor):
    """Norm i's SolveGrads and the proxies of its gamma, beta, and the previous conv's bias and response (None for
    the first norm), made at the solve's first evaluation and kept for the solve (func._solve_cache)."""
    key = ("grads", i, h.shape[0])
    entry = func._solve_cache.get(key)
    if entry is None:
        acc = SolveGrads(h.shape[0], h.shape[1], h.shape[2] * h.shape[3], response is not None, h.device)
        entry = func._solve_cache[key] = (acc, acc.proxies(norm.weight, norm.bias, bias, response))
    return entry
