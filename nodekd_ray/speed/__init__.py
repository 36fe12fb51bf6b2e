"""The speed machinery, a room of its own: what makes a student train faster without changing its function.

  dopri5.py       nodekd's dopri5: torchdiffeq's steps with fewer device operations, and noise-aware step control
  fused_norm.py   f's GroupNorm + ReLU as one Triton kernel each way (CUDA; Triton's interpreter on a CPU), and
                  f's layers on that path (fused_layers)
  cuda_graphs.py  a training solve's evaluations of f replayed from CUDA graphs, with a solve's shared inputs

The model code (models.py) does not import this package: importing it registers these parts in
models.SPEED_PARTS, and models.speed_part() imports it the first time a setting asks for one of them.
Measurements run on the reference computation (computation.REFERENCE_COMPUTATION), which uses none of this.
"""
from .. import models
from . import cuda_graphs, dopri5, fused_norm

models.register_speed_parts(dopri5=dopri5, fused_norm=fused_norm, cuda_graphs=cuda_graphs)
