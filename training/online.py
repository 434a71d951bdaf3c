"""Online hardening: every training batch is attacked against the current model and trained on at once.

The offline rounds of :mod:`guard.training.harden` (Nguyen et al. 2015) train the reject class on
an archive of images attacked once; that reject class learns the images it was shown (Grosse et
al. 2017's design, which Carlini & Wagner 2017 broke). Here the attack runs inside every step,
against the weights of that step (adversarial training; the methods and their losses are in
:mod:`guard.training.online_losses`), so what the model learns is to resist the attacker's
method, not last round's images.

The model keeps guard's (n+1)-class head for every method (:func:`~guard.training.grow_head`): the
plain methods never label anything reject (cross-entropy keeps the reject logit low), the
``reject`` method lets the reject class absorb what the attack finds.

Optimiser: SGD with Nesterov momentum 0.9 and weight decay 5e-4, the learning rate following a
cosine from ``lr`` to 0 over all steps of ``epochs`` epochs (the schedule of Wong et al. 2020 and
of the demo model's own training), computed from the global step, so that it needs no state.

Reproducible and resumable: the batch order of epoch e is seeded from ``(seed, e)``, each batch's
augmentation and random start from ``(seed, e, batch)``; the checkpoint (model, optimiser
momentum, history, the position in the epoch) is written every ``checkpoint_every`` batches and at
every epoch's end, so a run killed at any point resumes from its last checkpoint and ends with the
same weights, bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from guard.core.data import Split
from guard.core.models import model_device, predict_labels
from guard.training.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint
from guard.training.distributed import barrier, world
from guard.training.harden_data import HardenStream, digest, epoch_order, stream_accuracy
from guard.training.loop import ddp_wrap, mix_seed, train_mode
from guard.training.online_losses import attack_batch, default_step_size, method_loss

__all__ = ["OnlineHardener", "monitor_robustness"]

log = logging.getLogger(__name__)


def monitor_robustness(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int, *, eps: float, steps: int = 10, seed: int = 0
) -> dict[str, float]:
    """A cheap per-epoch look (not the evaluation): PGD on the wrong-real margin, ``steps`` steps.

    Returns the clean accuracy, the share of images classified right clean *and* not pushed to a
    wrong real class by the attack (robust with rejection) and the share still classified right
    (robust without counting rejections). :func:`guard.evaluate_robust` is the real measurement.
    """
    if len(x) == 0:
        return {}
    was = net.training
    net.eval()
    try:
        gen = torch.Generator().manual_seed(seed)
        dev = model_device(net)
        x, y = x.to(dev), y.to(dev)
        x_adv = attack_batch(
            net, x, y, method="reject", eps=eps, steps=steps, step_size=2.5 * eps / steps, n=n, gen=gen
        )
        with torch.no_grad():
            clean = net(x).argmax(1)
            adv = net(x_adv).argmax(1)
            ok = clean == y
            wrong_real = (adv != y) & (adv != n)
        return {
            "clean_accuracy": float(ok.float().mean()),
            "robust_with_rejection": float((ok & ~wrong_real).float().mean()),
            "robust_accuracy": float((ok & (adv == y)).float().mean()),
            "n": int(len(y)),
            "steps": steps,
        }
    finally:
        net.train(was)


class OnlineHardener:
    """One online hardening run (see the module docstring); built and run by :func:`guard.harden`."""

    def __init__(
        self,
        net: nn.Module,
        n: int,
        head: str,
        train: Split | HardenStream,
        held: Split | HardenStream,
        config: Any,
        *,
        augment: Callable | None,
        checkpoint_dir: str | Path | None,
        progress: bool,
        on_epoch_end: Callable[[int, int, nn.Module], None] | None,
        frozen: list[nn.Module],
        checkpoint_every: int = 0,
    ) -> None:
        self.net, self.n, self.head, self.train, self.held, self.cfg = net, n, head, train, held, config
        self.augment, self.checkpoint_dir, self.on_epoch_end, self.frozen = (
            augment,
            checkpoint_dir,
            on_epoch_end,
            frozen,
        )
        self.checkpoint_every = int(checkpoint_every)
        self.device = model_device(net)
        self.rank, self.size = world()
        self.show = progress and self.rank == 0
        stream = isinstance(train, HardenStream)
        self.fingerprint = {
            **config.to_dict(),
            "num_classes": n,
            "head": head,
            "n_train": len(train),
            "model_digest": digest(net.state_dict().values()),
            "data_digest": train.digest if stream else digest([train.x, train.y]),
        }
        if stream and not train.map_style:
            self.fingerprint["data_order"] = "the DataLoader's own"
        params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.local_bs = max(1, config.batch_size // self.size)
        self.per_epoch = math.ceil(len(train) / self.size / self.local_bs)
        self.eps = float(config.eps)
        self.meta: dict[str, Any] = {
            "epoch": 0,
            "batch": 0,
            "loss_sum": 0.0,
            "seen": 0,
            "history": [],
            "baseline": {},
            "train_seconds": 0.0,
        }

    # ---------------------------------------------------------------- checkpoints
    def _load(self) -> None:
        found = load_checkpoint(self.checkpoint_dir)
        if found is None:
            log.info("harden: no checkpoint in %s; starting from scratch", self.checkpoint_dir)
            return
        model_state, opt_state, _, meta = found
        old = {k: v for k, v in dict(meta.get("config", {})).items() if k != "epochs"}
        now = {k: v for k, v in self.fingerprint.items() if k != "epochs"}
        if old != now:
            diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
            raise CheckpointMismatch(
                f"cannot resume from {str(self.checkpoint_dir)!r}: the run's settings differ in {diff} "
                f"(checkpoint {[old.get(k) for k in diff]}, now {[now.get(k) for k in diff]})."
            )
        if meta["config"].get("epochs") != self.cfg.epochs:
            raise CheckpointMismatch(
                f"cannot resume from {str(self.checkpoint_dir)!r} with epochs={self.cfg.epochs}: it "
                f"was written for epochs={meta['config'].get('epochs')}, and the cosine learning rate "
                "depends on the total."
            )
        self.net.load_state_dict(model_state)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)
        self.meta = {k: meta[k] for k in self.meta}
        log.info(
            "harden: resumed at epoch %d batch %d from %s", self.meta["epoch"], self.meta["batch"], self.checkpoint_dir
        )

    def _checkpoint(self) -> None:
        if self.checkpoint_dir is None or self.rank != 0:
            return
        save_checkpoint(
            self.checkpoint_dir,
            self.net,
            self.opt,
            {"config": self.fingerprint, "rng": {"scheme": "seed per (seed, epoch, batch)"}, **self.meta},
        )

    # ---------------------------------------------------------------- data
    def _batches(self, epoch: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        seed = mix_seed(self.cfg.seed, epoch, 2)
        if isinstance(self.train, Split):
            order = epoch_order(len(self.train), seed, self.rank, self.size)
            for j, i in enumerate(range(0, order.numel(), self.local_bs)):
                idx = order[i : i + self.local_bs]
                yield j, self.train.x[idx], self.train.y[idx]
            return
        empty = torch.empty((0, *self.train.image_shape))
        for j, (_, xb, yb, _) in enumerate(
            self.train.epoch_batches(empty, self.n, 0.0, torch.Generator(), seed, self.rank, self.size, self.local_bs)
        ):
            yield j, xb, yb

    def _eps(self, epoch: int, j: int) -> float:
        """The attack radius at this step: ``eps`` after the linear warm-up of ``eps_warmup_epochs``."""
        warm = self.cfg.eps_warmup_epochs * self.per_epoch
        done = epoch * self.per_epoch + j + 1
        return self.eps if warm <= 0 or done >= warm else self.eps * done / warm

    def _lr(self, epoch: int, j: int) -> float:
        total = self.cfg.epochs * self.per_epoch
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * min(epoch * self.per_epoch + j, total) / total))

    # ---------------------------------------------------------------- measures
    def _held_sample(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.held, Split):
            return self.held.x[:k], self.held.y[:k]
        xs, ys, got = [], [], 0
        for xb, yb in self.held.batches():
            xs.append(xb), ys.append(yb)
            got += len(yb)
            if got >= k:
                break
        return torch.cat(xs)[:k], torch.cat(ys)[:k]

    def _clean(self) -> tuple[float, float]:
        if isinstance(self.held, HardenStream):
            return stream_accuracy(lambda x: predict_labels(self.net, x), self.held, self.n, self.head)
        pred = predict_labels(self.net, self.held.x).cpu()
        return float((pred == self.held.y).float().mean()), float((pred == self.n).float().mean())

    def _measure(self) -> dict[str, Any]:
        acc, rej = self._clean()
        out: dict[str, Any] = {"clean_accuracy": acc, "clean_rejected_share": rej}
        if self.cfg.monitor_images:
            x, y = self._held_sample(self.cfg.monitor_images)
            out["monitor"] = monitor_robustness(self.net, x, y, self.n, eps=self.eps, seed=self.cfg.seed)
        return out

    # ---------------------------------------------------------------- the run
    def run(self, *, resume: bool) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float]]:
        if resume:
            self._load()
        m = self.meta
        if not m["baseline"]:
            m["baseline"] = {"epoch": 0, **self._measure()}
        model = ddp_wrap(self.net, self.size, self.device)
        for epoch in tqdm(
            range(self.cfg.epochs), desc=f"harden ({self.cfg.method})", unit="epoch", disable=not self.show
        ):
            if epoch < m["epoch"]:
                continue
            self._epoch(model, epoch)
            entry = {
                "epoch": epoch + 1,
                "train_loss": m["loss_sum"] / max(1, m["seen"]),
                "lr_end": self._lr(epoch + 1, 0),
                **self._measure(),
                "train_seconds": round(m["train_seconds"], 3),
            }
            m["history"].append(entry)
            m.update(epoch=epoch + 1, batch=0, loss_sum=0.0, seen=0)
            log.info("harden: epoch %d %s", epoch + 1, entry)
            self._checkpoint()
            barrier()
            if self.on_epoch_end is not None:
                self.on_epoch_end(1, epoch, self.net)
        self.net.eval()
        return m["history"], m["baseline"], {"attack_seconds": 0.0, "train_seconds": round(m["train_seconds"], 3)}

    def _epoch(self, model: nn.Module, epoch: int) -> None:
        m, cfg = self.meta, self.cfg
        t0, since = time.perf_counter(), 0
        bar = tqdm(
            total=self.per_epoch,
            desc=f"epoch {epoch + 1}",
            unit="batch",
            disable=not self.show,
            leave=False,
            initial=m["batch"],
        )
        for j, xb, yb in self._batches(epoch):
            if j < m["batch"]:
                continue
            gen = torch.Generator().manual_seed(mix_seed(cfg.seed, epoch, j, 5))
            if self.augment is not None:
                xb = self.augment(xb, gen)
            xb, yb = xb.to(self.device), yb.to(self.device)
            self.net.eval()  # the attack sees the model as it serves (BatchNorm running statistics)
            eps = self._eps(epoch, j)
            step = (
                cfg.step_size * eps / self.eps
                if cfg.step_size is not None
                else default_step_size(cfg.method, eps, cfg.attack_steps)
            )
            x_adv = attack_batch(
                self.net, xb, yb, method=cfg.method, eps=eps, steps=cfg.attack_steps, step_size=step, n=self.n, gen=gen
            )
            train_mode(model, self.frozen)
            for group in self.opt.param_groups:
                group["lr"] = self._lr(epoch, j)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(cfg.seed, epoch, j, 7) + self.rank)  # dropout
                loss = method_loss(
                    model,
                    xb,
                    yb,
                    x_adv,
                    method=cfg.method,
                    n=self.n,
                    beta=cfg.trades_beta,
                    reject_weight=cfg.reject_weight,
                )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            m["loss_sum"] += float(loss.detach()) * len(yb)
            m["seen"] += len(yb)
            m["batch"] = j + 1
            since += 1
            bar.update(1)
            if self.checkpoint_every and since >= self.checkpoint_every and m["batch"] < self.per_epoch:
                m["train_seconds"] += time.perf_counter() - t0
                t0, since = time.perf_counter(), 0
                self._checkpoint()
        bar.close()
        m["train_seconds"] += time.perf_counter() - t0
