# the H100 digits_precision.sh fp32 student (width 512, stem 64, Adam, batch 32, 20-epoch schedule, seed 0) on the CPU,
# with a checkpoint after epochs 6, 8 and 10 (stopped after 10: the 2-core CPU takes about 280 s per epoch)
import sys
from dataclasses import asdict
import torch
from nodekd_ray.models import NODEConfig
from nodekd_ray.train import StudentConfig, train_student, _load
from nodekd_ray.data import channel_stats
from nodekd_ray.results import atomic_torch_save

node = NODEConfig(width=512, stem_channels=64, precision="fp32", solver_impl="nodekd")
cfg = StudentConfig(node=node, kd=False, dataset="digits", epochs=20, batch_size=32, optimizer="adam",
                    crop_padding=0, seed=0).validate()
train, test = _load(cfg)
mean, std = channel_stats(train.images)

class Stop(Exception):
    pass

def on_epoch(metrics, state):
    e = state["epoch"]
    if e in (6, 8, 10):
        atomic_torch_save({"format": "nodekd-checkpoint-v1", "arch": "node", "num_classes": train.num_classes,
                           "mean": [float(v) for v in mean], "std": [float(v) for v in std], "node": asdict(node),
                           "meta": {"epoch": e, "test_accuracy": metrics["test_accuracy"]},
                           "state_dict": {k: v.detach().cpu() for k, v in state["model"].items()}},
                          f"/tmp/w512/e{e}.pt")
        print(f"saved /tmp/w512/e{e}.pt", flush=True)
    if e >= 10:
        raise Stop

try:
    train_student(cfg, data=(train, test), on_epoch=on_epoch)
except Stop:
    pass
