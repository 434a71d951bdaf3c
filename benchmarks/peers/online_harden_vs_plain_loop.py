"""Cost of guard.harden's online methods against a plain PyTorch loop of the same method, in one process.

For each method, one epoch over the same images with the same model, batch size, attack steps and
optimiser (SGD, Nesterov momentum 0.9, weight decay 5e-4): ``guard.harden(method=...)`` against the
loop a user would write from the papers (Madry et al.'s PGD loop, Wong et al.'s FGSM-with-random-start
loop, TRADES, the abstain loss), both timed in turn ``--repeats`` times (the median counts). The
ratio guard / plain is the figure (the goal: <= 1.1). Writes benchmarks/results/bench_online_harden.json.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.online_harden_vs_plain_loop --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import guard
from guard.core.provenance import write_results
from guard.training import HardenConfig, harden
from guard.training.reject import grow_head


def _plain_epoch(net, x, y, method: str, eps: float, steps: int, bs: int, lr: float, n: int) -> None:
    """The method as a plain loop (what guard's online loop must not be slower than)."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    perm = torch.randperm(len(x))
    alpha = 1.25 * eps if method == "fgsm_rs" else 2.5 * eps / steps
    for i in range(0, len(x), bs):
        xb, yb = x[perm[i : i + bs]], y[perm[i : i + bs]]
        net.eval()
        if method == "trades":
            with torch.no_grad():
                p = F.softmax(net(xb), 1)
            xa = (xb + 1e-3 * torch.randn_like(xb)).clamp(0, 1)
        else:
            xa = (xb + torch.empty_like(xb).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(1 if method == "fgsm_rs" else steps):
            xa.requires_grad_(True)
            z = net(xa)
            if method == "trades":
                obj = F.kl_div(F.log_softmax(z, 1), p, reduction="sum")
            elif method == "reject":
                m = torch.zeros_like(z, dtype=torch.bool)
                m[torch.arange(len(yb)), yb] = True
                m[:, n] = True
                obj = (torch.logsumexp(z.masked_fill(m, -1e9), 1) - torch.logsumexp(z.masked_fill(~m, -1e9), 1)).sum()
            else:
                obj = F.cross_entropy(z, yb)
            (g,) = torch.autograd.grad(obj, xa)
            xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), xb - eps), xb + eps).clamp(0, 1)
        net.train()
        if method in ("pgd", "fgsm_rs"):
            loss = F.cross_entropy(net(xa), yb)
        else:
            both = net(torch.cat([xb, xa]))
            c, a = both[: len(xb)], both[len(xb) :]
            if method == "trades":
                loss = F.cross_entropy(c, yb) + 6.0 * F.kl_div(
                    F.log_softmax(a, 1), F.softmax(c, 1), reduction="batchmean"
                )
            else:
                lp = F.log_softmax(a, 1)
                loss = F.cross_entropy(c, yb) - torch.logaddexp(lp.gather(1, yb[:, None])[:, 0], lp[:, n]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/bench_online_harden.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = guard.demo_data()
    x, y = train.x[: args.images], train.y[: args.images]
    model = guard.demo_model(progress=False)
    # warm-up (first-call costs: allocator, kernels, imports) outside the timings
    harden(
        model,
        (x[:128], y[:128]),
        config=HardenConfig.online("pgd", eps=args.eps, epochs=1, attack_steps=1, monitor_images=0),
        progress=False,
    )
    _plain_epoch(grow_head(copy.deepcopy(model))[0], x[:128], y[:128], "pgd", args.eps, 1, args.batch_size, 0.05, 10)
    rows = {}
    for method in ("pgd", "fgsm_rs", "trades", "reject"):
        t_guard, t_plain = [], []
        for r in range(args.repeats):
            cfg = HardenConfig.online(
                method,
                eps=args.eps,
                epochs=1,
                attack_steps=args.steps,
                batch_size=args.batch_size,
                monitor_images=0,
                seed=r,
            )
            t0 = time.perf_counter()
            harden(model, (x, y), test=(x[:64], y[:64]), config=cfg, progress=False)
            t_guard.append(time.perf_counter() - t0)
            net, _ = grow_head(copy.deepcopy(model))
            torch.manual_seed(r)
            t0 = time.perf_counter()
            _plain_epoch(net, x, y, method, args.eps, args.steps, args.batch_size, 0.05, 10)
            t_plain.append(time.perf_counter() - t0)
        g, pl = statistics.median(t_guard), statistics.median(t_plain)
        rows[method] = {
            "guard_seconds": round(g, 3),
            "plain_seconds": round(pl, 3),
            "ratio": round(g / pl, 3),
            "guard_all": [round(t, 3) for t in t_guard],
            "plain_all": [round(t, 3) for t in t_plain],
        }
        print(f"{method:8s} guard {g:7.2f} s  plain loop {pl:7.2f} s  ratio {g / pl:.3f}", flush=True)
    write_results(
        args.out,
        {
            "model": "guard.demo_model('mnist') (DemoNet)",
            "images": args.images,
            "eps": args.eps,
            "attack_steps": args.steps,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "note": "guard's time includes its per-epoch clean-accuracy pass on 64 held-out images",
            "methods": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
