"""Hardening by iterative (n+1)-class retraining against fresh attacks (Nguyen et al. 2015).

Nguyen, Yosinski, Clune, "Deep Neural Networks are Easily Fooled", CVPR 2015, sec. 3.3: add a
"fooling images" class, then repeat: attack the *current* model with fresh fooling images
(direct and CPPN evolution, gradient ascent) and localized patches, label them n, add them
to the training data, fine-tune, evaluate.

Each round ``r``:

1. the attacks of :mod:`training.round_attacks` run against the model after round ``r - 1``
   (round 1: the caller's model). These images also *measure* that model: how many classes
   still get a >= 99% fooling image, the median fooling confidence, the patch fooling rate
   (``history[r - 1]["fresh"]``; round 0 is the baseline);
2. they join the reject archive (all earlier rounds are kept);
3. ``epochs_per_round`` epochs of fine-tuning on the clean data plus reject images drawn from
   the archive so that they are ``reject_share`` of every epoch (neither swamping nor
   vanishing however large the archive grows);
4. clean accuracy and the share of this round's attacks the model now rejects.

After the last round one more fresh generation measures the final model. Every epoch's
shuffling, reject sampling and dropout are seeded from ``(seed, round, epoch)``, so a run
resumed from a checkpoint gives the same model as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from guard.core.data import Split, load_data
from guard.core.models import eval_mode
from guard.core.validation import check_float, check_int
from guard.training.checkpoint import load_checkpoint, save_checkpoint
from guard.training.distributed import barrier, broadcast_tensors, init_from_env, world
from guard.training.reject import RejectClassifier, grow_head
from guard.training.round_attacks import (DEFAULT_ATTACKS, ENGINES, AttackBudget, RoundAttackSet, check_attacks, generate_round_attacks,
                                    score_attack_set)

__all__ = ["harden", "HardenResult"]

log = logging.getLogger(__name__)

_SET_NAMES = ("x", "kind", "target", "source")


@dataclass
class HardenResult:
    """What :func:`harden` returns.

    Attributes:
        model: the hardened :class:`~training.reject.RejectClassifier` (n+1 outputs, eval mode).
        history: one dict per round (``round``, ``clean_accuracy``, ``rejected_share_of_round_attacks``,
            ``fresh``: how fresh attacks against the model after that round fare, and timings).
        baseline: the same measures for the model before hardening (round 0).
        archive_size: reject images accumulated over all rounds.
        timings: seconds spent generating attacks and training, in total.
    """

    model: RejectClassifier
    history: list[dict[str, Any]]
    baseline: dict[str, Any] = field(default_factory=dict)
    archive_size: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def _seed(*parts: int) -> int:
    s = 0x9E3779B1
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**40)
    return s


def _digest(tensors: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, reject: int | None = None) -> tuple[float, float]:
    """(accuracy, share predicted as reject); a rejected clean image counts as an error."""
    correct, rejected = 0, 0
    with torch.no_grad(), eval_mode(model):
        for i in range(0, x.shape[0], 1000):
            pred = model(x[i:i + 1000].to(device)).argmax(1).cpu()
            correct += int((pred == y[i:i + 1000]).sum())
            rejected += int((pred == reject).sum()) if reject is not None else 0
    return correct / max(1, int(x.shape[0])), rejected / max(1, int(x.shape[0]))


def _split_data(data: Any, test: Any) -> tuple[Split, Split | None]:
    if test is None and isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, Split) for d in data):
        return load_data(data[0], "data[0]"), load_data(data[1], "data[1]")
    return load_data(data, "data"), (load_data(test, "test") if test is not None else None)


def harden(
    model: nn.Module,
    data: Any,
    *,
    test: Any = None,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    rounds: int = 3,
    epochs_per_round: int = 2,
    reject_share: float = 0.12,
    head: str | None = None,
    num_classes: int | None = None,
    budget: AttackBudget | None = None,
    lr: float = 5e-4,
    batch_size: int = 64,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    on_epoch_end: Callable[[int, int, nn.Module], None] | None = None,
    attack_engine: str = "builtin",
) -> HardenResult:
    """Retrain ``model`` with an (n+1)-th reject class against fresh attacks, round after round.

    Args:
        model: the classifier (n outputs; images in [0, 1]). Never modified: a deep copy
            grows the head. A :class:`RejectClassifier` continues hardening with its head.
        data: the clean training data (anything :func:`guard.core.data.load_data` takes), or a
            ``(train, test)`` pair of :class:`~guard.core.data.Split`.
        test: clean held-out data for the per-round clean accuracy (default: the training data).
        attacks: round attack names (:data:`training.round_attacks.ROUND_ATTACKS`).
        rounds: number of rounds (>= 1).
        epochs_per_round: fine-tuning epochs per round (>= 1).
        reject_share: share of each epoch's images that are reject examples, in (0, 0.5].
        head: dotted name of the classifier's final ``nn.Linear`` (default: the last one).
        num_classes: n, checked against the head and the labels when given.
        budget: attack sizes per round (default :class:`AttackBudget()`).
        lr: Adam learning rate of the fine-tuning (constant).
        batch_size: global batch size (split across processes under torchrun).
        augment: optional ``augment(x, generator)`` for the clean images of each batch.
        checkpoint_dir: where to write the checkpoint after the attack phase of a round,
            after every epoch and after every round (rank 0 only; atomic).
        resume: continue from the checkpoint in ``checkpoint_dir`` (a finished epoch or round
            is never redone). Without a checkpoint there, start from scratch.
        seed: seeds everything (attacks, reject sampling, shuffling, dropout).
        progress: tqdm bars for rounds, attacks and epochs.
        on_epoch_end: ``on_epoch_end(round, epoch, model)`` after each epoch's checkpoint.
        attack_engine: ``"builtin"`` (small batched generators, the default) or ``"attacks"``
            (the fooling images from the ``attacks`` package's classes; see
            :func:`training.round_attacks.generate_round_attacks`).

    Returns:
        A :class:`HardenResult` with the hardened model and the per-round history.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    names = check_attacks(attacks)
    if attack_engine not in ENGINES:
        raise ValueError(f"attack_engine must be one of {ENGINES}; got {attack_engine!r}.")
    rounds = check_int(rounds, "rounds", "harden", low=1)
    epochs_per_round = check_int(epochs_per_round, "epochs_per_round", "harden", low=1)
    batch_size = check_int(batch_size, "batch_size", "harden", low=1)
    reject_share = check_float(reject_share, "reject_share", "harden", low=0.0, low_open=True, high=0.5)
    lr = check_float(lr, "lr", "harden", low=0.0, low_open=True)
    seed = check_int(seed, "seed", "harden", low=0)
    budget = budget if budget is not None else AttackBudget()
    if not isinstance(budget, AttackBudget):
        raise TypeError(f"budget must be an AttackBudget; got {type(budget).__name__}.")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (where the interrupted run wrote its checkpoint).")
    train, held = _split_data(data, test)

    # -- the (n+1)-class model
    if isinstance(model, RejectClassifier):
        n = model.num_classes
        if num_classes is not None and num_classes != n:
            raise ValueError(f"num_classes={num_classes} does not match the RejectClassifier's {n} classes.")
        import copy

        net, head_name = copy.deepcopy(model.model), model.head
    else:
        net, head_name = grow_head(model, num_classes=num_classes, head=head, seed=seed)
        n = int(net.state_dict()[head_name + ".weight"].shape[0]) - 1
    ymax = int(train.y.max())
    if ymax >= n:
        raise ValueError(f"num_classes mismatch: the labels of data go up to {ymax} but the head {head_name!r} has {n} outputs.")
    if held is not None and int(held.y.max()) >= n:
        raise ValueError(f"num_classes mismatch: the labels of test go up to {int(held.y.max())} but the head {head_name!r} has {n} outputs.")
    held = held if held is not None else train
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    image_shape = tuple(train.x.shape[1:])
    config = {"attacks": list(names), "epochs_per_round": epochs_per_round, "reject_share": reject_share, "lr": lr,
              "batch_size": batch_size, "seed": seed, "budget": asdict(budget), "num_classes": n, "head": head_name,
              "n_train": len(train), "engine": attack_engine,
              # a checkpoint of another model or other data must never be resumed
              "model_digest": _digest(net.state_dict().values()), "data_digest": _digest([train.x, train.y])}

    created = init_from_env(device)
    rank, size = world()
    try:
        return _run(net, n, head_name, train, held, names, rounds, epochs_per_round, reject_share, budget, lr, batch_size,
                    augment, checkpoint_dir, resume, seed, progress, on_epoch_end, device, image_shape, config, rank, size)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(net, n, head_name, train, held, names, rounds, epochs_per_round, reject_share, budget, lr, batch_size, augment,
         checkpoint_dir, resume, seed, progress, on_epoch_end, device, image_shape, config, rank, size) -> HardenResult:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history: list[dict[str, Any]] = []
    baseline: dict[str, Any] = {}
    archive_x = torch.empty((0, *image_shape))
    archive_round = torch.empty(0, dtype=torch.long)
    cur: RoundAttackSet | None = None
    cur_keep = torch.empty(0, dtype=torch.bool)  # which of ``cur`` joined the reject archive
    cur_round = 0  # the round whose attack set ``cur`` is
    round_done, epoch_done = 0, -1
    timings = {"attack_seconds": 0.0, "train_seconds": 0.0}
    round_secs = {"attack": 0.0, "train": 0.0}  # of the round in progress
    show = progress and rank == 0

    if resume:
        state = load_checkpoint(checkpoint_dir)
        if state is None:
            log.info("harden: no checkpoint in %s; starting from scratch", checkpoint_dir)
        else:
            model_state, opt_state, extra, meta = state
            old = {k: v for k, v in meta.get("config", {}).items()}
            if old != config:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise ValueError(f"cannot resume from {str(checkpoint_dir)!r}: the run's settings differ in {diff} "
                                 f"(checkpoint {[old.get(k) for k in diff]}, now {[config.get(k) for k in diff]}).")
            net.load_state_dict(model_state)
            if opt_state is not None:
                opt.load_state_dict(opt_state)
            history, baseline = meta["history"], meta["baseline"]
            round_done, epoch_done = int(meta["round_done"]), int(meta["epoch_done"])
            if round_done > rounds:
                raise ValueError(f"cannot resume from {str(checkpoint_dir)!r} with rounds={rounds}: it already holds "
                                 f"{round_done} finished rounds (pass rounds >= {round_done}).")
            timings = meta.get("timings", timings)
            archive_x, archive_round = extra["archive_x"], extra["archive_round"].long()
            cur_round = int(meta.get("cur_round", 0))
            round_secs = meta.get("round_seconds", round_secs)
            if cur_round:
                cur = RoundAttackSet.from_tensors({k: extra["cur_" + k] for k in _SET_NAMES}, meta["cur_names"], meta.get("cur_seconds"))
                cur_keep = extra["cur_keep"].bool()
            log.info("harden: resumed at round %d (epochs done %d) from %s", round_done, epoch_done + 1, checkpoint_dir)

    def checkpoint() -> None:
        if checkpoint_dir is None or rank != 0:
            return
        extra = {"archive_x": archive_x, "archive_round": archive_round}
        meta: dict[str, Any] = {"config": config, "round_done": round_done, "epoch_done": epoch_done, "history": history,
                                "baseline": baseline, "timings": timings, "cur_round": cur_round, "round_seconds": round_secs,
                                "rng": {"scheme": "seed per (seed, round, epoch)", "seed": seed}}
        if cur is not None:
            extra.update({"cur_" + k: v for k, v in cur.to_tensors().items()})
            extra["cur_keep"] = cur_keep
            meta["cur_names"], meta["cur_seconds"] = cur.names, cur.seconds
        save_checkpoint(checkpoint_dir, net, opt, meta, extra)

    def fresh_attacks(r: int) -> RoundAttackSet:
        """Rank 0 generates against the current model; the images are broadcast."""
        t0 = time.perf_counter()
        tensors, secs = None, {}
        if rank == 0:
            s = generate_round_attacks(net, names, num_classes=n, image_shape=image_shape, pool=(train.x, train.y),
                                       budget=budget, seed=_seed(seed, r, 1), progress=show,
                                       engine=config["engine"])
            tensors, secs = s.to_tensors(), s.seconds
        tensors = broadcast_tensors(tensors, _SET_NAMES)
        timings["attack_seconds"] += time.perf_counter() - t0
        round_secs["attack"] = time.perf_counter() - t0
        return RoundAttackSet.from_tensors(tensors, list(names), secs)

    def measure(s: RoundAttackSet) -> dict[str, Any]:
        out = score_attack_set(net, s, n)
        out["attack_seconds"] = {k: round(v, 3) for k, v in s.seconds.items()}
        return out

    if not baseline:
        acc, rej = _clean_accuracy(net, held.x, held.y, device, n)
        baseline = {"round": 0, "clean_accuracy": acc, "clean_rejected_share": rej}

    rounds_bar = tqdm(range(1, rounds + 1), desc="harden", unit="round", disable=not show, initial=0)
    for r in rounds_bar:
        if r <= round_done:
            continue
        if cur_round != r:  # attack phase of round r (against the model after round r - 1)
            cur = fresh_attacks(r)
            cur_round = r
            round_secs["train"] = 0.0
            fresh = measure(cur)
            if r == 1:
                baseline["fresh"] = fresh
            else:
                history[r - 2]["fresh"] = fresh
            cur_keep = _to_archive(net, cur, n)
            archive_x = torch.cat([archive_x, cur.x[cur_keep]])
            archive_round = torch.cat([archive_round, torch.full((int(cur_keep.sum()),), r, dtype=torch.long)])
            epoch_done = -1
            checkpoint()
        if cur is None:  # internal invariant: the attack phase always sets it
            raise RuntimeError(f"harden: round {r} has no attack set (corrupt checkpoint?)")
        ddp = _wrap(net, size, device)
        for e in tqdm(range(epochs_per_round), desc=f"round {r}", unit="epoch", disable=not show, leave=False):
            if e <= epoch_done:
                continue
            t0 = time.perf_counter()
            loss = _train_epoch(ddp, opt, train, archive_x, n, reject_share, batch_size, augment, _seed(seed, r, e, 2), rank, size, device)
            timings["train_seconds"] += time.perf_counter() - t0
            round_secs["train"] += time.perf_counter() - t0
            epoch_done = e
            log.info("harden: round %d epoch %d loss %.4f", r, e, loss)
            checkpoint()
            barrier()
            if on_epoch_end is not None:
                on_epoch_end(r, e, net)
        acc, rej = _clean_accuracy(net, held.x, held.y, device, n)
        entry = {"round": r, "clean_accuracy": acc, "clean_rejected_share": rej,
                 "rejected_share_of_round_attacks": _rejected_share(net, cur.x[cur_keep], n, device),
                 "rejected_share_of_all_round_images": score_attack_set(net, cur, n)["rejected_share"],
                 "n_round_attacks": int(cur_keep.sum()), "n_round_images": len(cur), "archive_size": int(archive_x.shape[0]),
                 "reject_share": reject_share, "epochs": epochs_per_round,
                 "seconds_attack": round(round_secs["attack"], 3), "seconds_train": round(round_secs["train"], 3)}
        if len(history) >= r:
            history[r - 1] = entry
        else:
            history.append(entry)
        round_done, epoch_done = r, -1
        checkpoint()
        barrier()
    if "fresh" not in history[-1]:
        final = fresh_attacks(rounds + 1)
        history[-1]["fresh"] = measure(final)
        checkpoint()
    for h in history:  # flatten the report's fixed keys
        f = h.get("fresh", {})
        for key in ("fooling_classes_ge99", "fooling_median_confidence", "patch_fooling_rate"):
            h[key] = f.get(key)
    net.eval()
    return HardenResult(RejectClassifier(net, n, head_name).eval(), history, baseline, int(archive_x.shape[0]),
                        {k: round(v, 3) for k, v in timings.items()})


def _predict(net: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.no_grad(), eval_mode(net):
        return torch.cat([net(x[i:i + 1000].to(device)).argmax(1).cpu() for i in range(0, x.shape[0], 1000)]) if len(x) else torch.empty(0, dtype=torch.long)


def _rejected_share(net: nn.Module, x: torch.Tensor, n: int, device: torch.device) -> float:
    return float((_predict(net, x, device) == n).float().mean()) if len(x) else 0.0


def _to_archive(net: nn.Module, s: RoundAttackSet, n: int) -> torch.Tensor:
    """Which attack images become reject examples: every fooling image (unrecognisable by
    construction), but a patched / PGD digit only where it fools the current model (a patched
    digit the model still reads correctly is a digit, and calling it "reject" would teach the
    model to reject clean digits)."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    pred = _predict(net, s.x, device)
    input_based = s.source >= 0
    return ~input_based | ((pred != s.source) & (pred < n))


def _wrap(net: nn.Module, size: int, device: torch.device) -> nn.Module:
    if size == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None)


def epoch_set(train: Split, archive_x: torch.Tensor, n: int, reject_share: float,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One epoch's images: all clean ones plus reject images making up ``reject_share`` of the total.

    The reject images are drawn uniformly from the whole archive (every earlier round's
    images stay eligible): without replacement when the archive is large enough, otherwise
    repeated, so the reject class never swamps the clean classes nor vanishes.

    Returns:
        ``(x, y, is_clean)``.
    """
    n_clean = len(train)
    n_rej = int(round(reject_share / (1.0 - reject_share) * n_clean)) if archive_x.shape[0] else 0
    if archive_x.shape[0] >= n_rej:
        pick = torch.randperm(archive_x.shape[0], generator=gen)[:n_rej]
    else:
        pick = torch.randint(0, archive_x.shape[0], (n_rej,), generator=gen)
    x = torch.cat([train.x, archive_x[pick]])
    y = torch.cat([train.y, torch.full((n_rej,), n, dtype=torch.long)])
    is_clean = torch.cat([torch.ones(n_clean, dtype=torch.bool), torch.zeros(n_rej, dtype=torch.bool)])
    return x, y, is_clean


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, train: Split, archive_x: torch.Tensor, n: int,
                 reject_share: float, batch_size: int, augment, epoch_seed: int, rank: int, size: int, device) -> float:
    """One epoch over the clean data plus ``reject_share`` reject images drawn from the archive."""
    gen = torch.Generator().manual_seed(epoch_seed)
    x, y, is_clean = epoch_set(train, archive_x, n, reject_share, gen)
    sampler = DistributedSampler(TensorDataset(y), num_replicas=size, rank=rank, shuffle=True, seed=epoch_seed % (2**31))
    order = torch.tensor(list(sampler), dtype=torch.long)
    local_bs = max(1, batch_size // size)
    total, count = 0.0, 0
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(epoch_seed + rank)  # dropout
        for i in range(0, order.numel(), local_bs):
            idx = order[i:i + local_bs]
            xb, yb = x[idx], y[idx]
            if augment is not None:
                c = is_clean[idx]
                if bool(c.any()):
                    xb = xb.clone()
                    xb[c] = augment(xb[c], gen)
            logits = model(xb.to(device))
            loss = F.cross_entropy(logits, yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
    model.eval()
    return total / max(1, count)
