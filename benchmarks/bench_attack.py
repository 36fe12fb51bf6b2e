"""Claim: nodekd's PGD eps-sweep (0..20/255) is at least as fast as torchattacks' PGD looped
over eps on the same model and data, at equal robust accuracy.

How: a ResNet20 trained for a few epochs on digits (the held-out 359 images), eps = 0, 2, ..., 20
/255, steps s = floor(min(255 eps + 4, 1.25 * 255 eps)), step 1/255, random start. The baseline
computes the clean accuracy once (eps = 0) and runs torchattacks.PGD for each eps > 0. Ours shares
the clean pass and does not attack images the model already gets wrong (they count as not
robust either way). Both measured in this run; robust accuracies printed side by side (they
differ only through the random start).

    .venv/bin/python benchmarks/bench_attack.py [--epochs 5]
"""
import argparse
import time

import torch
import torchattacks

from nodekd_ray.attacks import attack_sweep, steps_for_eps
from nodekd_ray.data import load_dataset
from nodekd_ray.train import TeacherConfig, train_teacher


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of the attacked ResNet20")
    ap.add_argument("--batch-size", type=int, default=359, help="attack batch size (both sides)")
    args = ap.parse_args()
    data = load_dataset("digits")
    torch.manual_seed(0)
    model, hist, _ = train_teacher(TeacherConfig(dataset="digits", epochs=args.epochs), data=data,
                                   progress=False, log=lambda m: None)
    model.eval()
    test = data[1]
    eps_list = [k / 255 for k in range(0, 21, 2)]

    t0 = time.perf_counter()
    res = attack_sweep(model, test.images, test.labels, attack="pgd", eps_list=eps_list, batch_size=args.batch_size)
    ours_s = time.perf_counter() - t0
    ours = res.robust_accuracy()

    x_all, y_all = test.images.float() / 255, test.labels
    t0 = time.perf_counter()
    ref = {}
    for e in eps_list:
        correct = 0
        for s in range(0, len(y_all), args.batch_size):
            x, y = x_all[s:s + args.batch_size], y_all[s:s + args.batch_size]
            if e > 0:
                x = torchattacks.PGD(model, eps=e, alpha=1 / 255, steps=steps_for_eps(e), random_start=True)(x, y)
            with torch.no_grad():
                correct += int((model(x).argmax(1) == y).sum())
        ref[e] = correct / len(y_all)
    ref_s = time.perf_counter() - t0

    print(f"ResNet20 on digits ({len(y_all)} test images), clean accuracy {ours[0.0]:.4f}; threads {torch.get_num_threads()}")
    print("  eps/255  steps  nodekd  torchattacks")
    for e in eps_list:
        print(f"  {e * 255:7.0f}  {steps_for_eps(e):5d}  {ours[e]:6.4f}  {ref[e]:12.4f}")
    diff = max(abs(ours[e] - ref[e]) for e in eps_list)
    print(f"time: nodekd {ours_s:.1f}s, torchattacks loop {ref_s:.1f}s; ratio {ref_s / ours_s:.2f}x (target >= 1.0x)")
    print(f"largest robust-accuracy difference: {diff:.4f} ({diff * len(y_all):.0f} images)")


if __name__ == "__main__":
    main()
