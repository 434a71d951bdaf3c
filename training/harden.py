"""Hardening by iterative (n+1)-class retraining against fresh attacks (Nguyen et al. 2015).

Nguyen, Yosinski, Clune, "Deep Neural Networks are Easily Fooled", CVPR 2015, sec. 3.3: add a
"fooling images" class, then repeat: attack the *current* model with fresh fooling images
(direct and CPPN evolution, gradient ascent) and localized patches, label them n, add them
to the training data, fine-tune, evaluate.

Each round ``r``:

1. the attacks of :func:`guard.training.round_attacks.round_attack_table` run against the
   model after round ``r - 1`` (round 1: the caller's model). These images also *measure*
   that model: how many classes still get a >= 99% fooling image, the median fooling
   confidence, the patch fooling rate (``history[r - 1]["fresh"]``; round 0 is the baseline);
2. they join the reject archive (all earlier rounds are kept; ``reject_images`` given by the
   caller open it as round 0);
3. ``epochs_per_round`` epochs of fine-tuning on the clean data plus reject images drawn from
   the archive so that they are ``reject_share`` of every epoch (neither swamping nor
   vanishing however large the archive grows);
4. clean accuracy and the share of this round's attacks the model now rejects.

After the last round one more fresh generation measures the final model. Every epoch's
shuffling, reject sampling and dropout are seeded from ``(seed, round, epoch)``, so a run
resumed from a checkpoint gives the same model as an uninterrupted one. Data given as a
Dataset, DataLoader or image folder is streamed, never held whole
(:mod:`guard.training.harden_data`).

:func:`harden` is the one entry point; :class:`HardenConfig` holds the one set of defaults
that ``guard harden`` (also under ``torchrun``), the audit's harden step and the Python API
start from.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from guard.core.data import Split, is_stream, load_data
from guard.core.models import model_device, predict_labels
from guard.core.validation import check_float, check_images, check_int
from guard.training.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint
from guard.training.distributed import barrier, broadcast_tensors, process_group, world
from guard.training.harden_data import HardenStream, check_shardable, digest, epoch_order, reject_picks, stream_accuracy
from guard.training.loop import ddp_wrap as _wrap
from guard.training.loop import mix_seed as _seed
from guard.training.loop import train_mode as _train_mode
from guard.training.online_losses import ONLINE_METHODS
from guard.training.reject import RejectClassifier, grow_head
from guard.training.round_attacks import (
    DEFAULT_ATTACKS,
    FOOLING_ATTACKS,
    AttackBudget,
    RoundAttackSet,
    check_attacks,
    generate_round_attacks,
    score_attack_set,
)

__all__ = ["harden", "HardenConfig", "HardenResult", "CheckpointMismatch", "epoch_set"]

log = logging.getLogger(__name__)

_SET_NAMES = ("x", "kind", "target", "source")


@dataclass(frozen=True)
class HardenConfig:
    """The settings of a hardening run: the one set of defaults every front end starts from.

    Attributes:
        rounds: attack-and-retrain rounds (>= 1).
        epochs_per_round: fine-tuning epochs per round (>= 1).
        reject_share: share of each epoch's images that are reject examples, in (0, 0.5].
        lr: Adam learning rate of the fine-tuning (constant).
        batch_size: global batch size (split across processes under torchrun).
        attacks: round attack names (:data:`guard.training.round_attacks.ROUND_ATTACKS`).
        budget: attack sizes per round.
        seed: seeds everything (attacks, reject sampling, shuffling, dropout).
        head: dotted name of the classifier's final ``nn.Linear`` (default: the last one).
        online_fooling_steps: 0 (default) or K: every training batch also gets one fresh fooling
            image per class, made by K steps of gradient ascent from noise against the model as
            it is at that moment (:class:`~guard.attacks.FoolingGradient`), labelled reject:
            adversarial training of the reject class, so the attacker's own method is what the
            model learns to reject, not only last round's images.
        trainable: None (default): every parameter is fine-tuned. A tuple of dotted module names
            (``("1._conv_head", "1._bn1")``; ``()`` for the head alone): only their parameters and
            the head's (always: the reject row must learn) are fine-tuned; every other parameter is
            frozen and every other module stays in eval mode while training, so BatchNorm
            statistics and dropout of the frozen part never change (fine-tuning the last stages of
            a pretrained network when the whole one does not fit the budget).
        freeze_known_classes: False (default): the whole head learns. True: the head's rows for
            the n known classes (weights and biases) keep their values and only the reject row
            learns (with whatever ``trainable`` unfreezes). With ``trainable=()`` the hardened
            model then gives exactly the original's logits for the known classes, plus a reject
            logit: nothing it knew can be forgotten, and clean accuracy can only fall by images
            it rejects. For fine-tuning data that does not cover every class (a sample of a few
            images per class, or none for some): training the known rows on it pushes down the
            logits of the classes it lacks, as the ImageNet benchmark of issue 20 showed (top-1 on
            held-out classes fell from 90% to 0%).
        method: ``"rounds"`` (default): the offline rounds above (attack once per round, archive,
            retrain). An online method attacks every training batch against the current model and
            trains on it at once (:mod:`guard.training.online`): ``"pgd"`` (Madry et al. 2018),
            ``"fgsm_rs"`` (Wong et al. 2020), ``"trades"`` (Zhang et al. 2019) or ``"reject"``
            (adversarial training with the reject class as an abstain option, Laidlaw & Feizi 2019).
            The online methods use ``epochs``, ``eps``, ``attack_steps``, ``step_size``,
            ``trades_beta``, ``reject_weight``, ``monitor_images``, ``lr`` (SGD with Nesterov
            momentum and a cosine schedule; :meth:`online` gives working defaults), ``batch_size``,
            ``seed``, ``head``, ``trainable`` and ``freeze_known_classes``; the rounds' fields
            (``rounds``, ``attacks``, ``budget``, ``reject_share`` ...) do not apply.
        epochs: online methods: training epochs over the data.
        eps: online methods: the L-inf radius the attack may move each pixel (required; in (0, 1]).
        attack_steps: online PGD / TRADES / reject: the attack's steps (FGSM with random start: 1).
        step_size: the attack's step; None: 1.25 eps for ``fgsm_rs``, 2.5 eps / steps otherwise.
        trades_beta: the weight of the TRADES KL term.
        reject_weight: the weight of the ``reject`` method's adversarial abstain term.
        eps_warmup_epochs: online methods: the attack's radius grows linearly from 0 to ``eps``
            over this many epochs (step by step), then stays (0: ``eps`` from the first step); a
            large radius from the first step can collapse a fine-tuned model to one class.
        monitor_images: held-out images attacked after every epoch for the history's cheap
            robustness look (10-step PGD; 0: none). Not an evaluation: see :func:`guard.evaluate_robust`.
    """

    rounds: int = 3
    epochs_per_round: int = 2
    reject_share: float = 0.12
    lr: float = 5e-4
    batch_size: int = 64
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    budget: AttackBudget = AttackBudget()
    seed: int = 0
    head: str | None = None
    online_fooling_steps: int = 0
    trainable: tuple[str, ...] | None = None
    freeze_known_classes: bool = False
    method: str = "rounds"
    epochs: int = 10
    eps: float | None = None
    attack_steps: int = 10
    step_size: float | None = None
    trades_beta: float = 6.0
    reject_weight: float = 1.0
    monitor_images: int = 256
    eps_warmup_epochs: float = 0.0

    @classmethod
    def online(cls, method: str = "reject", *, eps: float, **overrides: Any) -> HardenConfig:
        """Defaults for an online method: SGD at lr 0.05 (cosine), batch 128, 10 epochs, 10 attack steps."""
        return cls(**{"method": method, "eps": eps, "lr": 0.05, "batch_size": 128, "epochs": 10, **overrides})

    @classmethod
    def quick(cls, **overrides: Any) -> HardenConfig:
        """One short round with small attacks (smoke runs, the quick audit)."""
        return cls(**{"rounds": 1, "epochs_per_round": 1, "budget": AttackBudget.quick(), **overrides})

    def validated(self) -> HardenConfig:
        owner = "harden"
        if not isinstance(self.budget, AttackBudget):
            raise TypeError(f"budget must be an AttackBudget; got {type(self.budget).__name__}.")
        if self.head is not None and not isinstance(self.head, str):
            raise TypeError(f"head must be a dotted module name (str) or None; got {type(self.head).__name__}.")
        trainable = self.trainable
        if trainable is not None:
            if (
                isinstance(trainable, str)
                or not isinstance(trainable, (tuple, list))
                or not all(isinstance(t, str) and t for t in trainable)
            ):
                raise TypeError(f"trainable must be None or a tuple of dotted module names (str); got {trainable!r}.")
            trainable = tuple(trainable)
        if not isinstance(self.freeze_known_classes, bool):
            raise TypeError(
                f"freeze_known_classes must be a bool; got {type(self.freeze_known_classes).__name__} "
                f"({self.freeze_known_classes!r})."
            )
        if not isinstance(self.method, str) or self.method not in ("rounds", *ONLINE_METHODS):
            raise ValueError(
                f"The 'method' parameter of harden must be one of {['rounds', *ONLINE_METHODS]}. Got {self.method!r}."
            )
        if self.method != "rounds" and self.eps is None:
            raise ValueError(
                f"The 'eps' parameter of harden is required by method={self.method!r}: the L-inf radius in "
                "[0, 1] pixel units (e.g. 8/255 for CIFAR-10, 0.3 for MNIST). Got None."
            )
        return dataclasses.replace(
            self,
            eps=None if self.eps is None else check_float(self.eps, "eps", owner, low=0.0, low_open=True, high=1.0),
            epochs=check_int(self.epochs, "epochs", owner, low=1),
            attack_steps=check_int(self.attack_steps, "attack_steps", owner, low=1),
            step_size=None
            if self.step_size is None
            else check_float(self.step_size, "step_size", owner, low=0.0, low_open=True, high=1.0),
            trades_beta=check_float(self.trades_beta, "trades_beta", owner, low=0.0),
            reject_weight=check_float(self.reject_weight, "reject_weight", owner, low=0.0),
            monitor_images=check_int(self.monitor_images, "monitor_images", owner, low=0),
            eps_warmup_epochs=check_float(self.eps_warmup_epochs, "eps_warmup_epochs", owner, low=0.0),
            rounds=check_int(self.rounds, "rounds", owner, low=1),
            epochs_per_round=check_int(self.epochs_per_round, "epochs_per_round", owner, low=1),
            reject_share=check_float(self.reject_share, "reject_share", owner, low=0.0, low_open=True, high=0.5),
            lr=check_float(self.lr, "lr", owner, low=0.0, low_open=True),
            batch_size=check_int(self.batch_size, "batch_size", owner, low=1),
            attacks=check_attacks(self.attacks),
            seed=check_int(self.seed, "seed", owner, low=0),
            online_fooling_steps=check_int(self.online_fooling_steps, "online_fooling_steps", owner, low=0),
            trainable=trainable,
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON types; the offline rounds leave out the online methods' fields (so
        that a checkpoint of an earlier version, which had none of them, still resumes)."""
        d = asdict(self)
        d["attacks"] = list(self.attacks)
        d["trainable"] = None if self.trainable is None else list(self.trainable)
        if self.method == "rounds":
            for k in _ONLINE_FIELDS:
                d.pop(k)
        return d


_ONLINE_FIELDS = (
    "method",
    "epochs",
    "eps",
    "attack_steps",
    "step_size",
    "trades_beta",
    "reject_weight",
    "monitor_images",
    "eps_warmup_epochs",
)


@dataclass
class HardenResult:
    """What :func:`harden` returns.

    Attributes:
        model: the hardened :class:`~guard.training.RejectClassifier` (n+1 outputs, eval mode).
        history: one dict per round (``round``, ``clean_accuracy``, ``rejected_share_of_round_attacks``,
            ``fresh``: how fresh attacks against the model after that round fare, and timings).
        baseline: the same measures for the model before hardening (round 0).
        archive_size: reject images accumulated over all rounds.
        timings: seconds spent generating attacks and training, in total.
        config: the settings of the run.
    """

    model: RejectClassifier
    history: list[dict[str, Any]]
    baseline: dict[str, Any] = field(default_factory=dict)
    archive_size: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    config: HardenConfig | None = None


_Data = Split | HardenStream  # tensors (the fast path) or a stream read batch by batch


def _split_data(data: Any, test: Any, batch_size: int) -> tuple[_Data, _Data | None]:
    """The training data and the held-out data: tensors as :func:`load_data` makes them, or a
    Dataset / DataLoader / image folder as a :class:`HardenStream` (not read yet)."""
    if test is None and isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, Split) for d in data):
        return load_data(data[0], "data[0]"), load_data(data[1], "data[1]")
    train = HardenStream(data, "data", batch_size) if is_stream(data) else load_data(data, "data")
    if test is None:
        return train, None
    return train, (HardenStream(test, "test", batch_size) if is_stream(test) else load_data(test, "test"))


def harden(
    model: nn.Module,
    data: Any,
    *,
    test: Any = None,
    config: HardenConfig | None = None,
    num_classes: int | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, int, nn.Module], None] | None = None,
    reject_images: torch.Tensor | None = None,
    checkpoint_every: int = 0,
    **overrides: Any,
) -> HardenResult:
    """Retrain ``model`` with an (n+1)-th reject class against fresh attacks, round after round.

    Args:
        model: the classifier (n outputs; images in [0, 1]). Never modified: a deep copy
            grows the head. A :class:`RejectClassifier` continues hardening with its head.
        data: the clean training data (anything :func:`guard.load_data` takes), or a
            ``(train, test)`` pair of :class:`~guard.Split`. Tensors are the fast path; a
            ``Dataset``, ``DataLoader`` or image folder is streamed, never held whole
            (:mod:`guard.training.harden_data`): one scan first (count, labels, the checkpoint
            digest), then every epoch reads it batch by batch, a Dataset in the seeded order
            the tensor path would shuffle the same images into (same weights; a resumed run
            sees the same order), a DataLoader in its own order and batching (not under
            torchrun); the round attacks start from a seeded sample of it (read by index from
            a Dataset; one more pass per round of a DataLoader). A DataLoader that shuffles
            gives another digest each pass, so it cannot resume: pass its Dataset.
        test: clean held-out data for the per-round clean accuracy (default: the training data);
            a stream is evaluated batch by batch.
        config: a :class:`HardenConfig` (default ``HardenConfig()``).
        num_classes: n, checked against the head and the labels when given.
        augment: optional ``augment(x, generator)`` for the clean images of each batch.
        checkpoint_dir: where to write the checkpoint after the attack phase of a round,
            after every epoch and after every round (rank 0 only; atomic).
        resume: continue from the checkpoint in ``checkpoint_dir`` (a finished epoch or round
            is never redone); without one there, start from scratch. A checkpoint of other
            settings, another model or other data raises :class:`CheckpointMismatch`.
        progress: tqdm bars for rounds, attacks and epochs.
        on_epoch_end: ``on_epoch_end(round, epoch, model)`` after each epoch's checkpoint.
        reject_images: optional known-bad images (N, C, H, W) in [0, 1], the data's image shape,
            labelled reject from round 1 on beside each round's own attacks: fooling images an
            earlier, longer evolution found (Nguyen et al. retrain on the images of their
            evolution run), or inputs flagged in production. They open the reject archive
            (``archive_size`` counts them); their digest is part of the checkpoint's settings.
            Offline rounds only.
        checkpoint_every: online methods: also write the checkpoint every this many batches
            inside an epoch (0: at epoch ends only), so that a long epoch killed midway loses
            at most that many batches; a resumed run still ends bit-identical.
        **overrides: any :class:`HardenConfig` field (``rounds=5``), replacing ``config``'s.

    Returns:
        A :class:`HardenResult` with the hardened model and the per-round history.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    config = _resolved_config(config, overrides)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (where the interrupted run wrote its checkpoint).")
    train, held = _split_data(data, test, config.batch_size)
    check_shardable(train, "data", max(world()[1], int(os.environ.get("WORLD_SIZE", "1"))))
    net, n, head_name = _network(model, num_classes, config)
    if isinstance(train, HardenStream):  # its one pass, once the model is known to be usable
        train.scan(with_digest=checkpoint_dir is not None)
    _check_labels(train, held, n, head_name)
    reject_images = _checked_reject_images(reject_images, train, config.method)
    held = held if held is not None else train
    run_kw = {"augment": augment, "checkpoint_dir": checkpoint_dir, "progress": progress, "on_epoch_end": on_epoch_end}
    if config.method != "rounds":
        return _harden_online(
            net, n, head_name, train, held, config, checkpoint_every=checkpoint_every, resume=resume, **run_kw
        )
    return _harden_rounds(net, n, head_name, train, held, config, reject_images=reject_images, resume=resume, **run_kw)


def _resolved_config(config: HardenConfig | None, overrides: dict[str, Any]) -> HardenConfig:
    """``config`` (default ``HardenConfig()``) with ``overrides`` applied, validated; unknown fields raise."""
    config = config if config is not None else HardenConfig()
    if not isinstance(config, HardenConfig):
        raise TypeError(f"config must be a HardenConfig; got {type(config).__name__}.")
    known = {f.name for f in dataclasses.fields(HardenConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"harden() got unknown keyword argument(s) {unknown}; HardenConfig fields are {sorted(known)}.")
    return dataclasses.replace(config, **overrides).validated()


def _network(model: nn.Module, num_classes: int | None, config: HardenConfig) -> tuple[nn.Module, int, str]:
    """(network with an n+1-output head, n, the head's name): a copy of ``model``, never ``model`` itself."""
    if isinstance(model, RejectClassifier):
        n = model.num_classes
        if num_classes is not None and num_classes != n:
            raise ValueError(f"num_classes={num_classes} does not match the RejectClassifier's {n} classes.")
        return copy.deepcopy(model.model), n, model.head
    net, head_name = grow_head(model, num_classes=num_classes, head=config.head, seed=config.seed)
    return net, int(net.state_dict()[head_name + ".weight"].shape[0]) - 1, head_name


def _check_labels(train: _Data, held: _Data | None, n: int, head_name: str) -> None:
    """The labels of the training data (and of held-out tensors) must fit the head's n classes."""
    ymax = train.ymax if isinstance(train, HardenStream) else int(train.y.max())
    if ymax >= n:
        raise ValueError(
            f"num_classes mismatch: the labels of data go up to {ymax} but the head {head_name!r} has {n} outputs."
        )
    if isinstance(held, Split) and int(held.y.max()) >= n:  # a stream's labels are checked as it is evaluated
        raise ValueError(
            f"num_classes mismatch: the labels of test go up to {int(held.y.max())} but the head {head_name!r} has {n} outputs."
        )


def _checked_reject_images(reject_images: torch.Tensor | None, train: _Data, method: str) -> torch.Tensor | None:
    """``reject_images`` checked against the data's image shape, as float32 on the CPU; offline rounds only."""
    if reject_images is not None:
        check_images(reject_images, "reject_images")
        shape = train.image_shape if isinstance(train, HardenStream) else tuple(train.x.shape[1:])
        if tuple(reject_images.shape[1:]) != tuple(shape):
            raise ValueError(
                f"reject_images must have the data's image shape {tuple(shape)} (C, H, W); got "
                f"{tuple(reject_images.shape[1:])}."
            )
        reject_images = reject_images.detach().to("cpu", torch.float32).contiguous()
    if method != "rounds" and reject_images is not None:
        raise ValueError(
            f"reject_images apply to the offline rounds (method='rounds'); method={method!r} "
            "attacks every batch itself. Got reject_images with the online method."
        )
    return reject_images


def _harden_rounds(
    net: nn.Module,
    n: int,
    head: str,
    train: _Data,
    held: _Data,
    config: HardenConfig,
    *,
    reject_images: torch.Tensor | None,
    resume: bool,
    **kw: Any,
) -> HardenResult:
    """The offline rounds (:class:`_Hardener`), in a process group when torchrun started this process."""
    hardener = _Hardener(net, n, head, train, held, config, reject_images=reject_images, **kw)
    with process_group(hardener.device):
        return hardener.run(resume=resume)


def _harden_online(
    net: nn.Module,
    n: int,
    head: str,
    train: _Data,
    held: _Data,
    config: HardenConfig,
    *,
    checkpoint_every: int,
    resume: bool,
    **kw: Any,
) -> HardenResult:
    """The online methods (:mod:`guard.training.online`): the same model, checkpoints and result type as the rounds."""
    from guard.training.online import OnlineHardener

    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", "harden", low=0)
    frozen = _freeze(net, head, config.trainable)
    hooks = _freeze_known_rows(net, head, n) if config.freeze_known_classes else []
    hardener = OnlineHardener(net, n, head, train, held, config, frozen=frozen, checkpoint_every=checkpoint_every, **kw)
    with process_group(hardener.device):
        history, baseline, timings = hardener.run(resume=resume)
    net.eval()
    net.requires_grad_(True)
    for hook in hooks:
        hook.remove()
    return HardenResult(RejectClassifier(net, n, head).eval(), history, baseline, 0, timings, config)


@dataclass
class _State:
    """Everything a checkpoint holds besides the model and optimizer."""

    history: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)
    archive_x: torch.Tensor | None = None
    archive_round: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    cur: RoundAttackSet | None = None  # the attack set of round ``cur_round``
    cur_keep: torch.Tensor = field(
        default_factory=lambda: torch.empty(0, dtype=torch.bool)
    )  # which of it joined the archive
    cur_round: int = 0
    round_done: int = 0
    epoch_done: int = -1
    timings: dict[str, float] = field(default_factory=lambda: {"attack_seconds": 0.0, "train_seconds": 0.0})
    round_secs: dict[str, float] = field(default_factory=lambda: {"attack": 0.0, "train": 0.0})

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"archive_x": self.archive_x, "archive_round": self.archive_round}
        if self.cur is not None:
            out.update({"cur_" + k: v for k, v in self.cur.to_tensors().items()})
            out["cur_keep"] = self.cur_keep
        return out

    def meta(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "round_done": self.round_done,
            "epoch_done": self.epoch_done,
            "history": self.history,
            "baseline": self.baseline,
            "timings": self.timings,
            "cur_round": self.cur_round,
            "round_seconds": self.round_secs,
        }
        if self.cur is not None:
            m["cur_names"], m["cur_seconds"] = self.cur.names, self.cur.seconds
        return m

    @classmethod
    def restore(cls, extra: dict[str, torch.Tensor], meta: dict[str, Any]) -> _State:
        s = cls(
            history=meta["history"],
            baseline=meta["baseline"],
            archive_x=extra["archive_x"],
            archive_round=extra["archive_round"].long(),
            cur_round=int(meta.get("cur_round", 0)),
            round_done=int(meta["round_done"]),
            epoch_done=int(meta["epoch_done"]),
            timings=meta.get("timings", {"attack_seconds": 0.0, "train_seconds": 0.0}),
            round_secs=meta.get("round_seconds", {"attack": 0.0, "train": 0.0}),
        )
        if s.cur_round:
            s.cur = RoundAttackSet.from_tensors(
                {k: extra["cur_" + k] for k in _SET_NAMES}, meta["cur_names"], meta.get("cur_seconds")
            )
            s.cur_keep = extra["cur_keep"].bool()
        return s


class _Hardener:
    """One hardening run: the rounds, the checkpoints, the measurements."""

    def __init__(
        self,
        net: nn.Module,
        n: int,
        head: str,
        train: _Data,
        held: _Data,
        config: HardenConfig,
        *,
        augment: Callable | None,
        checkpoint_dir: str | Path | None,
        progress: bool,
        on_epoch_end: Callable[[int, int, nn.Module], None] | None,
        reject_images: torch.Tensor | None = None,
    ) -> None:
        self.net, self.n, self.head, self.train, self.held, self.cfg = net, n, head, train, held, config
        self.augment, self.checkpoint_dir, self.on_epoch_end = augment, checkpoint_dir, on_epoch_end
        self.device = model_device(net)
        stream = isinstance(train, HardenStream)
        self.image_shape = train.image_shape if stream else tuple(train.x.shape[1:])
        # a checkpoint of other settings, another model or other data must never be resumed;
        # the number of rounds may grow (continue a finished run with more rounds). A stream's
        # digest is the tensor path's (see HardenStream.scan); a DataLoader's own order is
        # another epoch schedule, so it is marked
        settings = {k: v for k, v in config.to_dict().items() if k != "rounds"}
        self.fingerprint = {
            **settings,
            "num_classes": n,
            "head": head,
            "n_train": len(train),
            "model_digest": digest(net.state_dict().values()),
            "data_digest": train.digest if stream else digest([train.x, train.y]),
        }
        if stream and not train.map_style:
            self.fingerprint["data_order"] = "the DataLoader's own"
        if reject_images is not None:
            self.fingerprint["reject_images"] = {"n": int(reject_images.shape[0]), "digest": digest([reject_images])}
        self.frozen = _freeze(net, head, config.trainable)
        self._row_hooks = _freeze_known_rows(net, head, n) if config.freeze_known_classes else []
        self.opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=config.lr)
        self.rank, self.size = world()
        self.show = progress and self.rank == 0
        given = reject_images if reject_images is not None else torch.empty((0, *self.image_shape))
        self.state = _State(archive_x=given, archive_round=torch.zeros(int(given.shape[0]), dtype=torch.long))

    # ---------------------------------------------------------------- checkpoints
    def _load(self) -> None:
        found = load_checkpoint(self.checkpoint_dir)
        if found is None:
            log.info("harden: no checkpoint in %s; starting from scratch", self.checkpoint_dir)
            return
        model_state, opt_state, extra, meta = found
        old = dict(meta.get("config", {}))
        if old != self.fingerprint:
            diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            raise CheckpointMismatch(
                f"cannot resume from {str(self.checkpoint_dir)!r}: the run's settings differ in {diff} "
                f"(checkpoint {[old.get(k) for k in diff]}, now {[self.fingerprint.get(k) for k in diff]})."
            )
        state = _State.restore(extra, meta)
        if state.round_done > self.cfg.rounds:
            raise CheckpointMismatch(
                f"cannot resume from {str(self.checkpoint_dir)!r} with rounds={self.cfg.rounds}: it already "
                f"holds {state.round_done} finished rounds (pass rounds >= {state.round_done})."
            )
        self.net.load_state_dict(model_state)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)
        self.state = state
        log.info(
            "harden: resumed at round %d (epochs done %d) from %s",
            state.round_done,
            state.epoch_done + 1,
            self.checkpoint_dir,
        )

    def _checkpoint(self) -> None:
        if self.checkpoint_dir is None or self.rank != 0:
            return
        meta = {
            "config": self.fingerprint,
            "rng": {"scheme": "seed per (seed, round, epoch)", "seed": self.cfg.seed},
            **self.state.meta(),
        }
        save_checkpoint(self.checkpoint_dir, self.net, self.opt, meta, self.state.tensors())

    # ---------------------------------------------------------------- attacks and measures
    def _fresh_attacks(self, r: int) -> RoundAttackSet:
        """Rank 0 attacks the current model; the images are broadcast to every rank."""
        t0 = time.perf_counter()
        tensors, secs = None, {}
        if self.rank == 0:
            s = generate_round_attacks(
                self.net,
                self.cfg.attacks,
                num_classes=self.n,
                image_shape=self.image_shape,
                pool=self._pool(r),
                budget=self.cfg.budget,
                seed=_seed(self.cfg.seed, r, 1),
                progress=self.show,
            )
            tensors, secs = s.to_tensors(), s.seconds
        tensors = broadcast_tensors(tensors, _SET_NAMES)
        self.state.timings["attack_seconds"] += time.perf_counter() - t0
        self.state.round_secs["attack"] = time.perf_counter() - t0
        return RoundAttackSet.from_tensors(tensors, list(self.cfg.attacks), secs)

    def _pool(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean images round r's patch / PGD attacks draw from: all of a Split; of a stream,
        a seeded sample of ``patch_images`` per such attack (one image when none runs: the
        data-range default of PGD's budget still looks at it)."""
        if isinstance(self.train, Split):
            return self.train.x, self.train.y
        k = self.cfg.budget.patch_images * sum(a not in FOOLING_ATTACKS for a in self.cfg.attacks)
        return self.train.sample(max(1, k), _seed(self.cfg.seed, r, 3))

    def _measure(self, s: RoundAttackSet) -> dict[str, Any]:
        out = score_attack_set(self.net, s, self.n)
        out["attack_seconds"] = {k: round(v, 3) for k, v in s.seconds.items()}
        return out

    def _clean(self) -> tuple[float, float]:
        """(accuracy, share predicted as reject) on the held-out data; a rejected image is an error."""
        if isinstance(self.held, HardenStream):
            return stream_accuracy(lambda x: predict_labels(self.net, x), self.held, self.n, self.head)
        pred = predict_labels(self.net, self.held.x).cpu()
        return float((pred == self.held.y).float().mean()), float((pred == self.n).float().mean())

    def _rejected_share(self, x: torch.Tensor) -> float:
        return float((predict_labels(self.net, x).cpu() == self.n).float().mean()) if len(x) else 0.0

    def _to_archive(self, s: RoundAttackSet) -> torch.Tensor:
        """Which attack images become reject examples: every fooling image (unrecognisable by
        construction), but a patched / PGD image only where it fools the current model (a
        patched digit the model still reads correctly is a digit, and calling it "reject"
        would teach the model to reject clean digits)."""
        pred = predict_labels(self.net, s.x).cpu()
        input_based = s.source >= 0
        return ~input_based | ((pred != s.source) & (pred < self.n))

    # ---------------------------------------------------------------- the rounds
    def run(self, *, resume: bool) -> HardenResult:
        st = self.state
        if resume:
            self._load()
            st = self.state
        if not st.baseline:
            acc, rej = self._clean()
            st.baseline = {"round": 0, "clean_accuracy": acc, "clean_rejected_share": rej}
        cfg = self.cfg
        for r in tqdm(range(1, cfg.rounds + 1), desc="harden", unit="round", disable=not self.show):
            if r <= st.round_done:
                continue
            if st.cur_round != r:
                self._attack_phase(r)
            if st.cur is None:  # internal invariant: the attack phase always sets it
                raise RuntimeError(f"harden: round {r} has no attack set (corrupt checkpoint?)")
            self._train_phase(r)
        if "fresh" not in st.history[-1]:
            st.history[-1]["fresh"] = self._measure(self._fresh_attacks(cfg.rounds + 1))
            self._checkpoint()
        for h in st.history:  # flatten the report's fixed keys
            f = h.get("fresh", {})
            for key in ("fooling_classes_ge99", "fooling_median_confidence", "patch_fooling_rate"):
                h[key] = f.get(key)
        self.net.eval()
        self.net.requires_grad_(True)  # the returned model is an ordinary one again
        for hook in self._row_hooks:
            hook.remove()
        return HardenResult(
            RejectClassifier(self.net, self.n, self.head).eval(),
            st.history,
            st.baseline,
            int(st.archive_x.shape[0]),
            {k: round(v, 3) for k, v in st.timings.items()},
            cfg,
        )

    def _attack_phase(self, r: int) -> None:
        """Round r's attacks against the model after round r - 1; they also measure that model."""
        st = self.state
        st.cur = self._fresh_attacks(r)
        st.cur_round = r
        st.round_secs["train"] = 0.0
        fresh = self._measure(st.cur)
        if r == 1:
            st.baseline["fresh"] = fresh
        else:
            st.history[r - 2]["fresh"] = fresh
        st.cur_keep = self._to_archive(st.cur)
        st.archive_x = torch.cat([st.archive_x, st.cur.x[st.cur_keep]])
        st.archive_round = torch.cat([st.archive_round, torch.full((int(st.cur_keep.sum()),), r, dtype=torch.long)])
        st.epoch_done = -1
        self._checkpoint()

    def _train_phase(self, r: int) -> None:
        st, cfg = self.state, self.cfg
        ddp = _wrap(self.net, self.size, self.device)
        for e in tqdm(range(cfg.epochs_per_round), desc=f"round {r}", unit="epoch", disable=not self.show, leave=False):
            if e <= st.epoch_done:
                continue
            t0 = time.perf_counter()
            plan = _EpochPlan(
                self.n,
                cfg.reject_share,
                cfg.batch_size,
                _seed(cfg.seed, r, e, 2),
                self.rank,
                self.size,
                cfg.online_fooling_steps,
            )
            loss = _train_epoch(ddp, self.opt, self.train, st.archive_x, plan, self.augment, self.device, self.frozen)
            st.timings["train_seconds"] += time.perf_counter() - t0
            st.round_secs["train"] += time.perf_counter() - t0
            st.epoch_done = e
            log.info("harden: round %d epoch %d loss %.4f", r, e, loss)
            self._checkpoint()
            barrier()
            if self.on_epoch_end is not None:
                self.on_epoch_end(r, e, self.net)
        acc, rej = self._clean()
        cur, keep = st.cur, st.cur_keep
        entry = {
            "round": r,
            "clean_accuracy": acc,
            "clean_rejected_share": rej,
            "rejected_share_of_round_attacks": self._rejected_share(cur.x[keep]),
            "rejected_share_of_all_round_images": score_attack_set(self.net, cur, self.n)["rejected_share"],
            "n_round_attacks": int(keep.sum()),
            "n_round_images": len(cur),
            "archive_size": int(st.archive_x.shape[0]),
            "reject_share": cfg.reject_share,
            "epochs": cfg.epochs_per_round,
            "seconds_attack": round(st.round_secs["attack"], 3),
            "seconds_train": round(st.round_secs["train"], 3),
        }
        if len(st.history) >= r:
            st.history[r - 1] = entry
        else:
            st.history.append(entry)
        st.round_done, st.epoch_done = r, -1
        self._checkpoint()
        barrier()


def _freeze(net: nn.Module, head: str, trainable: tuple[str, ...] | None) -> list[nn.Module]:
    """Set ``requires_grad`` per ``trainable`` (the head always trains); return the modules that
    must stay in eval mode while training (every one outside the trainable subtrees)."""
    if trainable is None:
        net.requires_grad_(True)
        return []
    modules = dict(net.named_modules())
    missing = [t for t in trainable if t not in modules]
    if missing:
        raise ValueError(
            f"trainable names modules the model does not have: {missing}; expected dotted names from "
            f"model.named_modules(), e.g. {[k for k in modules if k][:5]}."
        )
    roots = (*trainable, head)

    def inside(name: str) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    for name, p in net.named_parameters():
        p.requires_grad_(inside(name.rsplit(".", 1)[0]))
    return [m for name, m in modules.items() if not inside(name)]


def _freeze_known_rows(net: nn.Module, head: str, n: int) -> list[Any]:
    """Zero the gradient of the head's rows ``0..n-1`` (weight and bias), so that only row ``n``,
    the reject row, learns. Adam without weight decay (the hardening optimiser) then leaves those
    rows bit for bit as they were: its update is m / (sqrt(v) + eps) with m = v = 0."""
    lin = net.get_submodule(head)
    hooks = []
    for p in (lin.weight, lin.bias):
        if p is None:
            continue
        mask = torch.zeros_like(p)
        mask[n:] = 1.0
        hooks.append(p.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype)))
    return hooks


def epoch_set(
    train: Split, archive_x: torch.Tensor, n: int, reject_share: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One epoch's images: all clean ones plus reject images making up ``reject_share`` of the total.

    The reject images are drawn uniformly from the whole archive (every earlier round's
    images stay eligible): without replacement when the archive is large enough, otherwise
    repeated, so the reject class never swamps the clean classes nor vanishes.

    Returns:
        ``(x, y, is_clean)``.
    """
    n_clean = len(train)
    pick = reject_picks(n_clean, int(archive_x.shape[0]), reject_share, gen)
    n_rej = int(pick.numel())
    x = torch.cat([train.x, archive_x[pick]])
    y = torch.cat([train.y, torch.full((n_rej,), n, dtype=torch.long)])
    is_clean = torch.cat([torch.ones(n_clean, dtype=torch.bool), torch.zeros(n_rej, dtype=torch.bool)])
    return x, y, is_clean


def _split_batches(
    train: Split,
    archive_x: torch.Tensor,
    n: int,
    reject_share: float,
    gen: torch.Generator,
    epoch_seed: int,
    rank: int,
    size: int,
    local_bs: int,
):
    """The tensor path's epoch: :func:`epoch_set` shuffled, ``(offset, x, y, is_clean)`` per batch."""
    x, y, is_clean = epoch_set(train, archive_x, n, reject_share, gen)
    order = epoch_order(int(y.numel()), epoch_seed, rank, size)
    for i in range(0, order.numel(), local_bs):
        idx = order[i : i + local_bs]
        yield i, x[idx], y[idx], is_clean[idx]


@dataclass(frozen=True)
class _EpochPlan:
    """What one epoch of reject-class training draws: ``n`` known classes (label ``n`` = reject),
    ``reject_share`` of the batches from the archive, ``batch_size`` over all processes, the epoch's
    ``seed``, this process's shard (``rank`` of ``size``) and ``online_steps`` of fresh fooling
    images per batch (0: none)."""

    n: int
    reject_share: float
    batch_size: int
    seed: int
    rank: int = 0
    size: int = 1
    online_steps: int = 0


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    train: _Data,
    archive_x: torch.Tensor,
    plan: _EpochPlan,
    augment,
    device,
    frozen: list[nn.Module] | None = None,
) -> float:
    """One epoch over the clean data plus ``plan.reject_share`` reject images drawn from the archive
    (and, with ``plan.online_steps``, fresh gradient-ascent fooling images against the current model).
    A stream is read batch by batch (:meth:`HardenStream.epoch_batches`)."""
    from guard.attacks import FoolingGradient

    n, epoch_seed, online_steps = plan.n, plan.seed, plan.online_steps
    gen = torch.Generator().manual_seed(epoch_seed)
    local_bs = max(1, plan.batch_size // plan.size)
    shard = (plan.n, plan.reject_share, gen, epoch_seed, plan.rank, plan.size, local_bs)
    if isinstance(train, Split):
        batches = _split_batches(train, archive_x, *shard)
    else:
        batches = train.epoch_batches(archive_x, *shard)
    total, count = 0.0, 0
    frozen = frozen or []
    _train_mode(model, frozen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(epoch_seed + plan.rank)  # dropout
        for i, xb, yb, c in batches:
            if augment is not None and bool(c.any()):
                xb = xb.clone()
                xb[c] = augment(xb[c], gen)
            xb, yb = xb.to(device), yb.to(device)
            if online_steps > 0:
                net = model.module if hasattr(model, "module") else model
                fool = FoolingGradient(steps=online_steps, lr=0.1, threshold=0.99, seed=(epoch_seed + i) % (2**31))(
                    net, shape=tuple(xb.shape[1:]), classes=range(n)
                )
                _train_mode(model, frozen)
                xb = torch.cat([xb, fool.x_adv.detach().to(device)])
                yb = torch.cat([yb, torch.full((fool.x_adv.shape[0],), n, dtype=torch.long, device=device)])
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(c)
            count += len(c)
    model.eval()
    return total / max(1, count)
