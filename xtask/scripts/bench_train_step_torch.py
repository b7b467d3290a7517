"""The PyTorch side of `cargo xtask bench train-step --compare-pytorch`.

Same step as selfsup's: SimCLR with small-cnn (or torchvision resnet18 with a CIFAR stem), the
projection head Linear(D,512)-BN-ReLU-Linear(512,128), both views in one batch, NT-Xent (t=0.5),
backward, SGD (momentum 0.9, weight decay 5e-4). Random inputs. Prints the median step.
    python bench_train_step_torch.py --model small-cnn --batch 256 --steps 5 --threads 2
With --infer: the encoder's eval-mode forward under torch.inference_mode() instead.
"""
import argparse
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def peak_rss_mib():
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    high-water mark across execve, so a child started by the Rust bench would report the
    parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


p = argparse.ArgumentParser()
p.add_argument("--model", default="small-cnn")
p.add_argument("--batch", type=int, default=256)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--infer", action="store_true", help="time the encoder's eval-mode forward only")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)


def small_cnn():
    layers, c_in = [], 3
    for i, c in enumerate([32, 64, 128, 256]):
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if i < 3:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 256


def resnet18():
    import torchvision
    m = torchvision.models.resnet18()
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    return m, 512


enc, d = small_cnn() if a.model == "small-cnn" else resnet18()
head = nn.Sequential(nn.Linear(d, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 128))
params = list(enc.parameters()) + list(head.parameters())
opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def nt_xent(z0, z1, t=0.5):
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    sim = z @ z.T / t
    sim.fill_diagonal_(-1e9)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


if a.infer:
    enc.eval()
    x = torch.randn(a.batch, 3, 32, 32)
    times = []
    with torch.inference_mode():
        for i in range(a.steps + 1):
            t0 = time.perf_counter()
            enc(x).sum().item()
            if i > 0:
                times.append(time.perf_counter() - t0)
    times.sort()
    t = times[len(times) // 2]
    print(f"pytorch {torch.__version__} median: {t:.3f} s per batch, {a.batch / t:.1f} images/s; peak RSS {peak_rss_mib():.0f} MiB")
    raise SystemExit(0)

v0 = torch.randn(a.batch, 3, 32, 32)
v1 = torch.randn(a.batch, 3, 32, 32)
fw, bw = [], []
for i in range(a.steps + 1):
    t0 = time.perf_counter()
    z = head(enc(torch.cat([v0, v1])))
    loss = nt_xent(z[: a.batch], z[a.batch:])
    loss.item()
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    t2 = time.perf_counter()
    if i > 0:
        fw.append(t1 - t0)
        bw.append(t2 - t1)
fw.sort()
bw.sort()
f, b = fw[len(fw) // 2], bw[len(bw) // 2]



peak = peak_rss_mib()
print(f"pytorch {torch.__version__} median: forward {f:.3f} s, backward {b:.3f} s, {2 * a.batch / (f + b):.1f} images/s (views); peak RSS {peak:.0f} MiB")
