"""Claim: the device-resident batch iterator (nodekd_ray.data.Batches) produces randomly
cropped (pad 4) and flipped float batches >= 10x faster than a torchvision DataLoader with the
equivalent v2 transforms, on a 2-core CPU.

How: one epoch of 128-image batches over N uint8 3x32x32 images, timed after one warm-up epoch;
the baseline is the faster of num_workers=0 and num_workers=2. Both measured in this run.

    .venv/bin/python benchmarks/bench_loader.py [--n 10000]
"""
import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from nodekd_ray.data import Batches, load_dataset


class TransformSet(Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.tf = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                              v2.ToDtype(torch.float32, scale=True)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.tf(self.images[i]), self.labels[i]


def images_per_second(make_iter, n, epochs=2):
    for _ in make_iter():  # warm-up epoch (worker start-up, allocations)
        pass
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in make_iter():
            pass
    return epochs * n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="images in the set")
    args = ap.parse_args()
    train, _ = load_dataset("synthetic", synthetic_sizes=(args.n, 10))
    ours_it = Batches(train, batch_size=128, crop_padding=4, flip=True, seed=0)
    ours = images_per_second(lambda: ours_it, args.n)
    ds = TransformSet(train.images, train.labels)
    base = {}
    for workers in (0, 2):
        dl = DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
        base[workers] = images_per_second(lambda: dl, args.n)
    best = max(base.values())
    print(f"threads: {torch.get_num_threads()}  images: {args.n}  batch 128, crop pad 4 + flip")
    for w, v in base.items():
        print(f"  DataLoader + v2 transforms, num_workers={w}: {v:12,.0f} images/s")
    print(f"  nodekd Batches (device-resident, batched):  {ours:12,.0f} images/s")
    print(f"ratio vs best DataLoader: {ours / best:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
