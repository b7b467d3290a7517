"""torchvision.transforms.v2 with the simclr_cifar parameters, for `cargo xtask bench augment`.

Two views of each 32x32 uint8 image: RandomResizedCrop(32, scale=(0.08, 1)), flip,
RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8), RandomGrayscale(0.2), ToDtype + Normalize,
then stacked into batches (as a DataLoader's collate would). Run with N threads:
    python bench_augment_torchvision.py --threads 1
Threads here are torch intra-op threads (one process); --workers N uses a DataLoader with N
worker processes instead, the way training scripts run it.
"""
import argparse
import time

import torch
import torchvision.transforms.v2 as T

p = argparse.ArgumentParser()
p.add_argument("--images", type=int, default=5000)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--workers", type=int, default=0)
p.add_argument("--batch", type=int, default=512)
a = p.parse_args()
torch.set_num_threads(a.threads)

tf = T.Compose([
    T.RandomResizedCrop(32, scale=(0.08, 1.0), antialias=True),
    T.RandomHorizontalFlip(),
    T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
    T.RandomGrayscale(p=0.2),
    T.ToDtype(torch.float32, scale=True),
    T.Normalize([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
])
data = torch.randint(0, 256, (a.images, 3, 32, 32), dtype=torch.uint8)


class DS(torch.utils.data.Dataset):
    def __len__(self):
        return a.images

    def __getitem__(self, i):
        x = data[i]
        return tf(x), tf(x)


dl = torch.utils.data.DataLoader(DS(), batch_size=a.batch, num_workers=a.workers, shuffle=True)
for _ in dl:  # warm-up
    break
t = time.perf_counter()
n = 0
for v1, v2 in dl:
    n += v1.shape[0]
dt = time.perf_counter() - t
mode = f"{a.workers} worker processes" if a.workers else f"{a.threads} thread(s)"
print(f"torchvision {mode}: {n / dt:9.0f} images/s ({2 * n / dt:.0f} views/s)")
