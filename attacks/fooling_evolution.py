"""Fooling images by evolution: MAP-Elites over the classes, direct or CPPN encoding.

Nguyen, Yosinski, Clune. "Deep Neural Networks are Easily Fooled: High Confidence Predictions
for Unrecognizable Images", CVPR 2015, Sec. 3.1-3.2. MAP-Elites keeps one elite per class;
every generation, parents are drawn uniformly from the elites, mutated, scored by the model,
and a child replaces the elite of *every* class where its softmax confidence is higher.

* ``encoding="direct"``: the genome is the image. Initial pixels are uniform noise; each pixel
  mutates with probability ``mutation_rate`` (halved every ``rate_halving`` generations) by
  the polynomial mutation operator of strength ``eta`` (15 in the paper): :class:`DirectOptions`.
* ``encoding="cppn"``: the genome is a :class:`guard.attacks.cppn.Genome`, rendered at the model's
  resolution; mutations add nodes and connections, perturb weights, change activations. Its
  settings (initial CPPNs, mutation rates, gradient refinement) are a :class:`CPPNOptions`.

The archive is pyribs' :class:`ribs.archives.GridArchive` with one measure, the class index,
and ``dims=[num_classes]``, so each cell is one class. The paper's rule, "a child replaces the
elite of every class it beats", is a batch insertion of each child once per class, with that
class's confidence as the objective and the class as the measure: GridArchive keeps the best
per cell, which is exactly the rule (ties: the first). Only each class's best child of the
batch, and only where it beats that class's elite, is handed to pyribs: the same outcome as
inserting every (child, class) pair, without an (N x classes, pixels) array (50 children x
1,000 classes x 224 x 224 x 3 floats would be 30 GB). The archive stores the rendered images
as the solution and, for CPPNs, the genome's id as an extra field (genomes are variable-size,
so they live beside the archive, pruned to the ids the archive still holds).

:func:`transfer_check` scores fooling images made against one model with a second model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.base import AttackResult, Fooler, model_device
from guard.attacks.cppn import Genome, MutationRates, mutate, random_genome, render
from guard.attacks.cppn_refine import PolishOptions, polish_genomes, refine_weights
from guard.attacks.evolution_checkpoint import load_evolution_state, save_evolution_state
from guard.core.integrity import tensors_digest
from guard.core.models import eval_mode
from guard.core.validation import check_float, check_images, check_int, check_labels

__all__ = [
    "FoolingEvolution",
    "CPPNOptions",
    "DirectOptions",
    "ClassArchive",
    "polynomial_mutation",
    "transfer_check",
    "ENCODINGS",
]

log = logging.getLogger(__name__)

ENCODINGS = ("direct", "cppn")


def polynomial_mutation(x: torch.Tensor, rate: float, eta: float, gen: torch.Generator) -> torch.Tensor:
    """Deb's polynomial mutation on values in [0, 1]: each entry mutates with probability ``rate``."""
    u = torch.rand(x.shape, generator=gen)
    mask = torch.rand(x.shape, generator=gen) < rate
    e = 1.0 / (eta + 1.0)
    dq = torch.where(u < 0.5, (2 * u).pow(e) - 1.0, 1.0 - (2 * (1 - u)).pow(e))
    return torch.where(mask.to(x.device), x + dq.to(x.device, x.dtype), x).clamp_(0.0, 1.0)


class ClassArchive:
    """MAP-Elites archive with one cell per class, on pyribs' GridArchive.

    ``add(images, probs, genome_ids)`` inserts every image once per class (objective = that
    class's probability), so an image replaces the elite of every class where it is better.
    """

    def __init__(
        self, num_classes: int, image_shape: tuple[int, ...], *, seed: int = 0, with_ids: bool = False
    ) -> None:
        from ribs.archives import GridArchive  # pyribs pulls in numba (~2 s): imported when first used

        self.num_classes = check_int(num_classes, "num_classes", "ClassArchive", low=1)
        self.image_shape = tuple(int(s) for s in image_shape)
        dim = int(np.prod(self.image_shape))
        extra = {"genome_id": ((), np.int64)} if with_ids else None
        self.archive = GridArchive(
            solution_dim=dim,
            dims=[self.num_classes],
            ranges=[(-0.5, self.num_classes - 0.5)],
            seed=seed,
            solution_dtype=np.float32,
            extra_fields=extra,
        )
        self.with_ids = with_ids
        self._best = np.full(self.num_classes, -np.inf)  # each cell's elite objective (-inf: empty)

    def __len__(self) -> int:
        return len(self.archive)

    def add(self, images: torch.Tensor, probs: torch.Tensor, genome_ids: np.ndarray | None = None) -> np.ndarray:
        """Insert; returns the (N, K) status (0 not added, 1 improved, 2 new cell): per class only
        the batch's best child (the first on ties) can be added, where it beats the elite."""
        n, k = probs.shape
        if k != self.num_classes or images.shape[0] != n:
            raise ValueError(
                f"probs must be (N, {self.num_classes}) for N={images.shape[0]} images; got {tuple(probs.shape)}."
            )
        if self.with_ids and genome_ids is None:
            raise ValueError("genome_ids are required for an archive made with with_ids=True.")
        p = probs.detach().double().cpu().numpy()
        best_child = p.argmax(0)
        best_obj = p[best_child, np.arange(k)]
        cls = np.flatnonzero(best_obj > self._best)  # GridArchive's own rule: strictly better
        status = np.zeros((n, k), dtype=np.int64)
        if cls.size == 0:
            return status
        rows = best_child[cls]
        sol = images.detach().float().cpu().reshape(n, -1).numpy()[rows]
        fields: dict[str, Any] = {}
        if self.with_ids:
            fields["genome_id"] = np.asarray(genome_ids, dtype=np.int64)[rows]
        info = self.archive.add(sol, best_obj[cls], cls.astype(np.float64)[:, None], **fields)
        status[rows, cls] = np.asarray(info["status"])
        self._best[cls] = best_obj[cls]
        return status

    def confidences(self) -> np.ndarray:
        """Each class's elite confidence (K,), -inf where the cell is still empty (no copy of images)."""
        return self._best.copy()

    def genome_ids(self) -> np.ndarray:
        """The genome ids the archive holds (archives made with ``with_ids=True``)."""
        return np.asarray(self.archive.data("genome_id"))

    def retrieve(self, classes: np.ndarray) -> dict[str, Any]:
        """The elites of ``classes`` (every one must be filled): images and, with ids, genome ids."""
        occupied, d = self.archive.retrieve(np.asarray(classes, dtype=np.float64)[:, None])
        if not bool(np.all(occupied)):
            raise ValueError("retrieve: some of the requested classes have no elite yet.")
        out = {"images": torch.from_numpy(np.asarray(d["solution"], dtype=np.float32)).view(-1, *self.image_shape)}
        if self.with_ids:
            out["genome_id"] = np.asarray(d["genome_id"])
        return out

    def elites(self) -> dict[str, Any]:
        """Images (E, *shape), labels (E,), confidences (E,) and genome ids, sorted by class."""
        d = self.archive.data()
        labels = np.rint(np.asarray(d["measures"])[:, 0]).astype(np.int64)
        order = np.argsort(labels)
        out = {
            "images": torch.from_numpy(np.asarray(d["solution"], dtype=np.float32)[order]).view(-1, *self.image_shape),
            "labels": torch.from_numpy(labels[order]),
            "confidence": torch.from_numpy(np.asarray(d["objective"], dtype=np.float64)[order]),
        }
        if self.with_ids:
            out["genome_id"] = np.asarray(d["genome_id"])[order]
        return out

    def state(self, *, images: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The elites as tensors in pyribs' insertion order (which its parent draws depend on) and
        the archive generator's state: what :meth:`restore` needs to rebuild this archive exactly.
        ``images=False`` leaves the images out (a CPPN archive re-renders them from its genomes)."""
        d = self.archive.data(
            ["objective", "measures"] + (["solution"] if images else []) + (["genome_id"] if self.with_ids else [])
        )
        out = {
            "objective": torch.from_numpy(np.asarray(d["objective"], dtype=np.float64).copy()),
            "cell": torch.from_numpy(np.rint(np.asarray(d["measures"])[:, 0]).astype(np.int64)),
        }
        if images:
            out["solution"] = torch.from_numpy(np.asarray(d["solution"], dtype=np.float32).copy())
        if self.with_ids:
            out["genome_id"] = torch.from_numpy(np.asarray(d["genome_id"], dtype=np.int64).copy())
        return out, self._rng().bit_generator.state

    def restore(
        self, tensors: dict[str, torch.Tensor], rng_state: dict[str, Any], images: torch.Tensor | None = None
    ) -> None:
        """Refill an empty archive from :meth:`state`: one insertion per elite, in the saved order
        (``images``: the elites' images where the state has none)."""
        if len(self.archive):
            raise ValueError("restore needs an empty archive.")
        sol = (tensors["solution"] if images is None else images.reshape(images.shape[0], -1)).numpy()
        obj, cell = tensors["objective"].numpy(), tensors["cell"].numpy()
        if sol.shape[0] != obj.shape[0]:
            raise ValueError(f"checkpoint_dir: {sol.shape[0]} elite images for {obj.shape[0]} elites.")
        if (
            sol.shape[1:] != (int(np.prod(self.image_shape)),)
            or cell.size
            and (cell.min() < 0 or cell.max() >= self.num_classes)
        ):
            raise ValueError(
                f"checkpoint_dir: the saved archive does not fit {self.num_classes} classes of shape {self.image_shape}."
            )
        for i in range(obj.shape[0]):
            fields = {"genome_id": tensors["genome_id"].numpy()[i : i + 1]} if self.with_ids else {}
            self.archive.add(sol[i : i + 1], obj[i : i + 1], cell[i : i + 1].astype(np.float64)[:, None], **fields)
        self._best[cell] = obj
        self._rng().bit_generator.state = rng_state

    def _rng(self) -> np.random.Generator:
        rng = getattr(self.archive, "_rng", None)  # pyribs keeps the generator of sample_elites private
        if not isinstance(rng, np.random.Generator):
            raise RuntimeError("this pyribs version keeps no GridArchive._rng; evolution checkpoints need ribs 0.12.")
        return rng

    def sample(self, n: int) -> dict[str, Any]:
        """``n`` elites drawn uniformly with replacement (the archive's own seeded generator)."""
        d = self.archive.sample_elites(n)
        out = {"images": torch.from_numpy(np.asarray(d["solution"], dtype=np.float32)).view(n, *self.image_shape)}
        if self.with_ids:
            out["genome_id"] = np.asarray(d["genome_id"])
        return out


@dataclass
class _EvolutionRun:
    """The state of one :class:`FoolingEvolution` call: what a checkpoint saves and a resumed run restores.

    ``genomes`` maps a CPPN genome's id to the genome (pruned to the ids the archive still holds);
    ``pool_*`` is the reservoir of extra samples (images, labels, confidences) of which ``seen``
    were offered; ``g_done`` counts the generations run, ``all_fooled_at`` the first at which every
    class reached the threshold (-1: not yet).
    """

    shape: tuple[int, int, int]
    cls: torch.Tensor
    device: torch.device
    cppn: bool
    archive: ClassArchive
    gen: torch.Generator
    rng: np.random.Generator
    t0: float
    fingerprint: dict[str, Any] = field(default_factory=dict)
    genomes: dict[int, Genome] = field(default_factory=dict)
    next_id: int = 0
    pool_x: list[torch.Tensor] = field(default_factory=list)
    pool_l: list[int] = field(default_factory=list)
    pool_c: list[float] = field(default_factory=list)
    seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    all_fooled_at: int = -1
    g_done: int = 0
    refine_evals: int = 0
    polish_evals: int = 0
    before_polish: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.cells = int(self.cls.numel())
        self.cls_dev = self.cls.to(self.device)

    def adopt(self, kids: list[Genome]) -> np.ndarray:
        """Give new genomes the next ids and keep them; returns the ids."""
        ids = np.arange(self.next_id, self.next_id + len(kids))
        self.next_id += len(kids)
        for i, k in zip(ids, kids):
            self.genomes[int(i)] = k
        return ids

    def prune_genomes(self) -> None:
        """Drop the genomes no archive cell holds any more."""
        keep = {int(i) for i in self.archive.genome_ids()}
        self.genomes = {i: self.genomes[i] for i in keep}

    def probs(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The softmax over every output (a reject class too), one column per archive cell's class."""
        return F.softmax(model(x).float(), 1)[:, self.cls_dev]


@dataclass(frozen=True)
class DirectOptions:
    """The direct encoding's mutation (``FoolingEvolution(direct=...)``; the CPPN encoding ignores it).

    Args:
        mutation_rate: probability that a pixel mutates, in (0, 1].
        eta: strength of the polynomial mutation (15 in the paper), >= 0.
        rate_halving: generations between halvings of ``mutation_rate`` (>= 1).
    """

    mutation_rate: float = 0.1
    eta: float = 15.0
    rate_halving: int = 1000

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _settle(
            self,
            "mutation_rate",
            check_float(self.mutation_rate, "mutation_rate", owner, low=0.0, high=1.0, low_open=True),
        )
        _settle(self, "eta", check_float(self.eta, "eta", owner, low=0.0))
        _settle(self, "rate_halving", check_int(self.rate_halving, "rate_halving", owner, low=1))


@dataclass(frozen=True)
class CPPNOptions:
    """The CPPN encoding's settings (``FoolingEvolution(cppn=...)``; the direct encoding ignores
    the defaults, and refuses ``init_connections``, ``refine_every`` or ``polish_steps`` above 0).

    Args:
        init_hidden: add-node mutations applied to each initial CPPN (>= 0).
        init_connections: add-connection mutations applied to each initial CPPN after those
            (0, the default, as in the paper; denser CPPNs are what gradient refinement needs).
        rates: CPPN mutation probabilities.
        refine_every: 0 (the default, the paper) is pure evolution. With N > 0, every N
            generations the elites of the classes still below the threshold get
            ``refine_steps`` Adam steps (lr ``refine_lr``) on their connection weights
            (:func:`guard.attacks.cppn_refine.refine_weights`), and the refined genomes enter the
            archive as children by the same rule (they replace an elite only where they beat
            it): Lamarckian evolution. Their model calls are counted in ``refine_evaluations``.
        refine_steps, refine_lr: Adam steps (>= 1) and learning rate (> 0) of each refinement.
        refine_grow: ``True`` completes each refined genome's connections first (zero weights,
            the same image; ``refine_weights(grow=True)``); needs ``refine_every`` > 0.
        polish_steps: 0 (the default) ends with the archive evolution left. With N > 0, once the
            generations are spent, the classes still below the threshold get a last refinement:
            the ``polish_starts`` elites that give each such class the highest probability,
            connections completed, N Adam steps at ``polish_lr`` on the log-odds
            (:func:`guard.attacks.cppn_refine.polish_genomes`); the results enter the archive by
            the same rule. ``extras["elite_confidence_before_polish"]`` keeps what evolution (with
            any periodic refinement) reached, and ``polish_evaluations`` counts the model calls.
        polish_starts, polish_lr: elites polished per short class (>= 1) and the learning rate (> 0).
    """

    init_hidden: int = 2
    init_connections: int = 0
    rates: MutationRates = field(default_factory=MutationRates)
    refine_every: int = 0
    refine_steps: int = 25
    refine_lr: float = 0.1
    refine_grow: bool = False
    polish_steps: int = 0
    polish_starts: int = 4
    polish_lr: float = 0.05

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name, low in (("init_hidden", 0), ("init_connections", 0), ("refine_every", 0), ("refine_steps", 1)):
            _settle(self, name, check_int(getattr(self, name), name, owner, low=low))
        if not isinstance(self.rates, MutationRates):
            raise TypeError(
                f"The 'rates' parameter of {owner} must be a MutationRates. Got {type(self.rates).__name__}."
            )
        _settle(self, "refine_lr", check_float(self.refine_lr, "refine_lr", owner, low=0.0, low_open=True))
        if not isinstance(self.refine_grow, bool):
            raise TypeError(
                f"The 'refine_grow' parameter of {owner} must be a bool. Got {type(self.refine_grow).__name__}."
            )
        if self.refine_grow and not self.refine_every:
            raise ValueError(
                f"The 'refine_grow' parameter of {owner} changes refinement; "
                f"it needs refine_every > 0, got {self.refine_every}."
            )
        for name, low in (("polish_steps", 0), ("polish_starts", 1)):
            _settle(self, name, check_int(getattr(self, name), name, owner, low=low))
        _settle(self, "polish_lr", check_float(self.polish_lr, "polish_lr", owner, low=0.0, low_open=True))


def _settle(options: Any, name: str, value: Any) -> None:
    """Store a checked (normalised: a NumPy int becomes an int) value on a frozen options object."""
    object.__setattr__(options, name, value)


class FoolingEvolution(Fooler):
    """Evolve fooling images with MAP-Elites (one elite per class).

    Args:
        encoding: ``"direct"`` (pixels) or ``"cppn"``.
        population: children per generation (>= 1).
        generations: maximum generations.
        threshold: confidence that counts as fooled (0.9999 in the paper).
        stop_when_done: stop once every class's elite reaches the threshold (after
            ``extra_generations`` more, which fill the reservoir of extra samples).
        direct: the direct encoding's mutation, a :class:`DirectOptions` (per-pixel probability,
            polynomial-mutation strength, generations between halvings of the rate); None: its defaults.
        parent_selection: ``"uniform"`` (the paper: parents drawn uniformly from all elites) or
            ``"unfooled"`` (uniformly from the elites still below the threshold, all elites once
            every class is fooled; not in the paper: it spends the children on the classes
            that are left, which on the demo model are the slow ones, e.g. "1").
        extra_samples: besides the elites, keep a seeded reservoir sample of up to this many
            children that reached ``extra_threshold`` for their top class (positives for
            detectors, reject examples for hardening).
        extra_threshold: the confidence those children need (default: ``threshold``).
        cppn: the CPPN encoding's settings, a :class:`CPPNOptions` (initial CPPNs, mutation
            rates, periodic Lamarckian refinement, the last polish); None: its defaults. With
            ``encoding="direct"``, its ``init_connections``, ``refine_every`` and ``polish_steps``
            must stay 0.
        seed: seed of every random choice (torch, NumPy and the archive).

    :meth:`params` lists both option groups' fields flat, beside the other parameters (their
    names in report.json and in the fingerprint a checkpoint is resumed against).

    Call ``evolver(model, shape=(1, 28, 28), classes=None)`` -> :class:`AttackResult` (``classes``:
    the classes that get an archive cell, default all; confidences are always the softmax over
    every output, so a hardened model's reject class competes): ``x_adv`` the elites
    (sorted by class) then the extra samples; ``success`` = confidence >= threshold;
    ``extras``: ``label``, ``confidence``, ``is_elite``, ``generations``,
    ``generation_all_fooled`` (first generation at which all classes reached the threshold,
    -1 if never), ``seconds``, ``history`` and, for CPPNs, ``genomes`` of the elites.
    """

    def __init__(
        self,
        *,
        encoding: str = "direct",
        population: int = 100,
        generations: int = 1000,
        threshold: float = 0.9999,
        stop_when_done: bool = True,
        extra_generations: int = 0,
        direct: DirectOptions | None = None,
        parent_selection: str = "uniform",
        extra_samples: int = 100,
        extra_threshold: float | None = None,
        cppn: CPPNOptions | None = None,
        seed: int = 0,
    ) -> None:
        owner = type(self).__name__
        if encoding not in ENCODINGS:
            raise ValueError(f"The 'encoding' parameter of {owner} must be one of {ENCODINGS}. Got {encoding!r}.")
        self.encoding = encoding
        self.population = check_int(population, "population", owner, low=1)
        self.generations = check_int(generations, "generations", owner, low=1)
        self.threshold = check_float(threshold, "threshold", owner, low=0.0, high=1.0, low_open=True)
        self.stop_when_done = bool(stop_when_done)
        self.extra_generations = check_int(extra_generations, "extra_generations", owner, low=0)
        for name, value, kind in (("direct", direct, DirectOptions), ("cppn", cppn, CPPNOptions)):
            if value is not None and not isinstance(value, kind):
                raise TypeError(
                    f"The '{name}' parameter of {owner} must be a {kind.__name__} or None. Got {type(value).__name__}."
                )
        self.direct = DirectOptions() if direct is None else direct
        self.cppn = CPPNOptions() if cppn is None else cppn
        if encoding != "cppn":
            for name, what in (
                ("init_connections", "shapes initial CPPNs"),
                ("refine_every", "refines CPPN weights"),
                ("polish_steps", "refines CPPN weights"),
            ):
                if getattr(self.cppn, name):
                    raise ValueError(
                        f"The 'cppn' parameter of {owner} sets {name}={getattr(self.cppn, name)}, which {what}; "
                        f"it needs encoding='cppn', got {encoding!r}."
                    )
        if parent_selection not in ("uniform", "unfooled"):
            raise ValueError(
                f"The 'parent_selection' parameter of {owner} must be 'uniform' or 'unfooled'. "
                f"Got {parent_selection!r}."
            )
        self.parent_selection = parent_selection
        self.extra_samples = check_int(extra_samples, "extra_samples", owner, low=0)
        self.extra_threshold = (
            self.threshold
            if extra_threshold is None
            else check_float(extra_threshold, "extra_threshold", owner, low=0.0, high=1.0, low_open=True)
        )
        self.seed = check_int(seed, "seed", owner)

    def params(self) -> dict[str, Any]:
        """The configuration with both option groups flat (report.json's keys, and the settings a
        checkpoint is resumed against): ``rates`` is the CPPN mutation rates' dict, None for ``"direct"``."""
        d, c = self.direct, self.cppn
        return {
            "encoding": self.encoding,
            "population": self.population,
            "generations": self.generations,
            "threshold": self.threshold,
            "stop_when_done": self.stop_when_done,
            "extra_generations": self.extra_generations,
            "mutation_rate": d.mutation_rate,
            "eta": d.eta,
            "rate_halving": d.rate_halving,
            "init_hidden": c.init_hidden,
            "init_connections": c.init_connections,
            "parent_selection": self.parent_selection,
            "extra_samples": self.extra_samples,
            "extra_threshold": self.extra_threshold,
            "refine_every": c.refine_every,
            "refine_steps": c.refine_steps,
            "refine_lr": c.refine_lr,
            "refine_grow": c.refine_grow,
            "polish_steps": c.polish_steps,
            "polish_starts": c.polish_starts,
            "polish_lr": c.polish_lr,
            "seed": self.seed,
            "rates": dict(vars(c.rates)) if self.encoding == "cppn" else None,
        }

    def __call__(
        self,
        model: nn.Module,
        *,
        shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int | None = None,
        classes: Sequence[int] | None = None,
        progress: Callable[[int, int], None] | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 25,
    ) -> AttackResult:
        """Evolve; with ``checkpoint_dir``, the run's state is saved there every ``checkpoint_every``
        generations and after the last (:mod:`guard.attacks.evolution_checkpoint`), and a run
        started with a folder that holds one resumes from it: the same result as an uninterrupted
        run. Only ``generations`` may grow between the two; anything else refuses to resume."""
        shape, cls = self.targets(model, shape, classes, num_classes, distinct=True)
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every", type(self).__name__, low=1)
        device = model_device(model)
        with eval_mode(model), torch.no_grad():
            run = self._start(model, shape, cls, device, checkpoint_dir)
            for g_idx in range(run.g_done, 0 if self._finished(run) else self.generations):
                run.g_done = g_idx + 1
                children = [self._generation(run, model, g_idx)]
                if run.cppn and self.cppn.refine_every and run.g_done % self.cppn.refine_every == 0:
                    children += self._refine(run, model)
                if run.cppn:
                    run.prune_genomes()
                self._sample_extras(run, children)
                n_fooled = self._record(run, g_idx)
                if progress is not None:
                    progress(run.g_done, n_fooled)
                if n_fooled == run.cells and run.all_fooled_at < 0:
                    run.all_fooled_at = run.g_done
                stop = self._finished(run)
                if checkpoint_dir is not None and (
                    stop or run.g_done % checkpoint_every == 0 or run.g_done == self.generations
                ):
                    self._save(run, checkpoint_dir)
                if stop:
                    break
            # The polish is never checkpointed: the saved state is evolution's, so a run resumed or
            # continued to more generations evolves from the same archive as an uninterrupted one, and
            # polishes (deterministically) at its own end.
            if run.cppn and self.cppn.polish_steps:
                self._polish(run, model)
            return self._result(run, model)

    def _finished(self, run: _EvolutionRun) -> bool:
        """Every class fooled, and the extra generations after that spent (with ``stop_when_done``)."""
        return (
            self.stop_when_done and run.all_fooled_at > 0 and run.g_done >= run.all_fooled_at + self.extra_generations
        )

    def _start(
        self,
        model: nn.Module,
        shape: tuple[int, int, int],
        cls: torch.Tensor,
        device: torch.device,
        checkpoint_dir: str | Path | None,
    ) -> _EvolutionRun:
        """A fresh run's state, or the one saved in ``checkpoint_dir`` (refused if its settings differ)."""
        cppn = self.encoding == "cppn"
        run = _EvolutionRun(
            shape=shape,
            cls=cls,
            device=device,
            cppn=cppn,
            archive=ClassArchive(int(cls.numel()), shape, seed=self.seed, with_ids=cppn),
            gen=torch.Generator().manual_seed(self.seed),
            rng=np.random.default_rng(self.seed),
            t0=time.perf_counter(),
        )
        if checkpoint_dir is None:
            return run
        run.fingerprint = {
            "params": {k: v for k, v in self.params().items() if k != "generations"},
            "shape": list(shape),
            "classes": cls.tolist(),
            "model": tensors_digest(model.state_dict()),
        }
        st = load_evolution_state(checkpoint_dir, run.fingerprint)
        if st is None:
            return run
        run.genomes, run.gen, run.rng, run.history = st["genomes"], st["gen"], st["rng"], st["history"]
        # a CPPN's image is a pure function of its genome (rendered one by one), so it is not saved
        ims = _render_ids(run.genomes, st["archive"]["genome_id"], shape, device) if cppn else None
        run.archive.restore(st["archive"], st["archive_rng"], ims)
        run.pool_x, run.pool_l, run.pool_c = st["pool"]
        c = st["counters"]
        run.next_id, run.seen, run.all_fooled_at = c["next_id"], c["seen"], c["all_fooled_at"]
        run.g_done, run.refine_evals = c["generations"], c["refine_evaluations"]
        run.t0 -= c["seconds"]
        log.info("FoolingEvolution: resumed from %s at generation %d", checkpoint_dir, run.g_done)
        return run

    def _save(self, run: _EvolutionRun, checkpoint_dir: str | Path) -> None:
        a_tensors, a_rng = run.archive.state(images=not run.cppn)
        save_evolution_state(
            checkpoint_dir,
            fingerprint=run.fingerprint,
            archive=a_tensors,
            archive_rng=a_rng,
            rng=run.rng,
            gen=run.gen,
            genomes=run.genomes,
            pool=(run.pool_x, run.pool_l, run.pool_c),
            history=run.history,
            shape=run.shape,
            counters={
                "next_id": run.next_id,
                "seen": run.seen,
                "all_fooled_at": run.all_fooled_at,
                "generations": run.g_done,
                "refine_evaluations": run.refine_evals,
                "seconds": time.perf_counter() - run.t0,
            },
        )

    def _generation(self, run: _EvolutionRun, model: nn.Module, g_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One generation: children (random at first, then mutated elites) scored and offered to the archive."""
        shape, ids = run.shape, None
        parents = self._parents(run.archive, run.rng) if len(run.archive) else None
        if run.cppn:
            if parents is None:
                kids = [
                    random_genome(
                        shape[0], rng=run.rng, hidden=self.cppn.init_hidden, connections=self.cppn.init_connections
                    )
                    for _ in range(self.population)
                ]
            else:
                kids = [mutate(run.genomes[int(i)], run.rng, self.cppn.rates) for i in parents["genome_id"]]
            ids = run.adopt(kids)
            x = render(kids, shape[1], shape[2], device=run.device)
        else:
            if parents is None:
                x = torch.rand(self.population, *shape, generator=run.gen)
            else:
                rate = self.direct.mutation_rate * 0.5 ** (g_idx // self.direct.rate_halving)
                x = polynomial_mutation(parents["images"], rate, self.direct.eta, run.gen)
            x = x.to(run.device)
        probs = run.probs(model, x)
        run.archive.add(x, probs, ids)
        return x, probs

    def _refine(self, run: _EvolutionRun, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Lamarckian step (``cppn.refine_every``): Adam on the weights of the elites still below the threshold."""
        conf = run.archive.confidences()
        left = np.flatnonzero(np.isfinite(conf) & (conf < self.threshold))
        if not left.size:
            return []
        el = run.archive.retrieve(left)
        kids, _ = refine_weights(
            [run.genomes[int(i)] for i in el["genome_id"]],
            model,
            run.cls_dev[torch.from_numpy(left).to(run.device)],
            run.shape[1],
            run.shape[2],
            steps=self.cppn.refine_steps,
            lr=self.cppn.refine_lr,
            max_weight=self.cppn.rates.max_weight,
            grow=self.cppn.refine_grow,
        )
        rids = run.adopt(kids)
        xr = render(kids, run.shape[1], run.shape[2], device=run.device)
        pr = run.probs(model, xr)
        run.archive.add(xr, pr, rids)
        run.refine_evals += len(kids) * (self.cppn.refine_steps + 2)
        return [(xr, pr)]

    def _sample_extras(self, run: _EvolutionRun, children: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Reservoir sample (seeded) of the children at ``extra_threshold`` for their top class."""
        for xc, pc in children:
            top_c, top_l = pc.max(1)
            for j in (top_c >= self.extra_threshold).nonzero().flatten().tolist():
                run.seen += 1
                item = (xc[j].cpu(), int(run.cls[top_l[j]]), float(top_c[j]))
                if len(run.pool_x) < self.extra_samples:
                    run.pool_x.append(item[0])
                    run.pool_l.append(item[1])
                    run.pool_c.append(item[2])
                elif self.extra_samples:
                    r = int(run.rng.integers(run.seen))
                    if r < self.extra_samples:
                        run.pool_x[r], run.pool_l[r], run.pool_c[r] = item

    def _record(self, run: _EvolutionRun, g_idx: int) -> int:
        """The number of classes fooled now; a history entry every 10 generations and at the end."""
        conf_now = run.archive.confidences()
        filled = conf_now[np.isfinite(conf_now)]
        n_fooled = int((conf_now >= self.threshold).sum())
        if g_idx % 10 == 0 or n_fooled == run.cells or run.g_done == self.generations:
            run.history.append(
                {
                    "generation": run.g_done,
                    "classes_fooled": n_fooled,
                    "classes_filled": int(filled.size),
                    "median_confidence": float(torch.from_numpy(filled).median()),
                    "seconds": time.perf_counter() - run.t0,
                }
            )
        return n_fooled

    def _polish(self, run: _EvolutionRun, model: nn.Module) -> None:
        """``cppn.polish_steps``: a last refinement of the classes still below the threshold."""
        conf_now = run.archive.confidences()
        run.before_polish = torch.from_numpy(conf_now.copy()).float()
        short = np.flatnonzero(np.isfinite(conf_now) & (conf_now < self.threshold))
        if not short.size:
            return
        el = run.archive.elites()
        ims = el["images"].to(run.device)
        probs = torch.cat(
            [run.probs(model, ims[i : i + self.population]) for i in range(0, ims.shape[0], self.population)]
        )
        # elites() is sorted by cell; polish_genomes wants one row per genome, one column per cell
        kids, _ = polish_genomes(
            [run.genomes[int(i)] for i in el["genome_id"]],
            probs,
            short.tolist(),
            model,
            run.cls_dev,
            run.shape[1],
            run.shape[2],
            options=PolishOptions(
                starts=self.cppn.polish_starts,
                steps=self.cppn.polish_steps,
                lr=self.cppn.polish_lr,
                max_weight=self.cppn.rates.max_weight,
                chunk=self.population,
            ),
        )
        rids = run.adopt(kids)
        for i in range(0, len(kids), self.population):
            xr = render(kids[i : i + self.population], run.shape[1], run.shape[2], device=run.device)
            run.archive.add(xr, run.probs(model, xr), rids[i : i + self.population])
        run.prune_genomes()
        run.polish_evals += ims.shape[0] + len(kids) * (self.cppn.polish_steps + 2)

    def _result(self, run: _EvolutionRun, model: nn.Module) -> AttackResult:
        """The elites (sorted by class) then the extra samples, with their labels and confidences."""
        device, cls = run.device, run.cls
        el = run.archive.elites()
        xs = [el["images"]] + ([torch.stack(run.pool_x)] if run.pool_x else [])
        x_all = torch.cat(xs).to(device)
        labels = torch.cat([cls[el["labels"]], torch.tensor(run.pool_l, dtype=torch.long)]).to(device)
        # An elite's confidence is its archive objective, the softmax of the forward pass that
        # admitted it (re-scoring 1,000 elites at 224 px would cost as much as 20 generations of
        # 50); only the reservoir samples are re-scored, in chunks.
        pool_t = torch.stack(run.pool_x).to(device) if run.pool_x else x_all[:0]
        pool_lab = labels[el["labels"].numel() :]
        pool_conf = [
            F.softmax(model(pool_t[i : i + self.population]).float(), 1)
            .gather(1, pool_lab[i : i + self.population, None])
            .squeeze(1)
            for i in range(0, pool_t.shape[0], self.population)
        ]
        conf = torch.cat([el["confidence"].float().to(device), *pool_conf])
        n_el = int(el["labels"].numel())
        extras: dict[str, Any] = {
            "label": labels,
            "confidence": conf,
            "is_elite": torch.arange(labels.numel(), device=device) < n_el,
            "elite_confidence": el["confidence"].float(),
            "elite_label": cls[el["labels"]],
            "generations": run.g_done,
            "generation_all_fooled": run.all_fooled_at,
            "evaluations": run.g_done * self.population,
            "refine_evaluations": run.refine_evals,
            "polish_evaluations": run.polish_evals,
            "seconds": time.perf_counter() - run.t0,
            "history": run.history,
            "threshold": self.threshold,
            "encoding": self.encoding,
        }
        if run.before_polish is not None:
            extras["elite_confidence_before_polish"] = run.before_polish[el["labels"]]
        if run.cppn:
            extras["genomes"] = [run.genomes[int(i)].to_dict() for i in el["genome_id"]]
        return AttackResult(x_adv=x_all, success=conf >= self.threshold, target=labels, extras=extras)

    def _parents(self, archive: ClassArchive, rng: np.random.Generator) -> dict[str, Any]:
        if self.parent_selection == "uniform":
            return archive.sample(self.population)
        conf = archive.confidences()
        left = np.flatnonzero(np.isfinite(conf) & (conf < self.threshold))
        if left.size == 0:
            return archive.sample(self.population)
        return archive.retrieve(left[rng.integers(left.size, size=self.population)])


def _render_ids(
    genomes: dict[int, Genome], ids: torch.Tensor, shape: tuple[int, int, int], device: torch.device
) -> torch.Tensor:
    """The images of the genomes ``ids`` (on CPU), rendered on ``device`` as during the run."""
    if ids.numel() == 0:
        return torch.empty((0, *shape))
    return torch.cat(
        [render([genomes[int(i)] for i in chunk], shape[1], shape[2], device=device).cpu() for chunk in ids.split(256)]
    )


@torch.no_grad()
def transfer_check(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *, threshold: float = 0.9999, batch_size: int = 512
) -> dict[str, float]:
    """How a second model sees fooling images made for ``labels`` by a first one.

    Returns the share the second model labels as ``labels``, the share at >= ``threshold``
    confidence for that label, and the median confidence of that label.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    check_images(x, "x")
    labels = check_labels(labels, "labels", n=int(x.shape[0]))
    threshold = check_float(threshold, "threshold", "transfer_check", low=0.0, high=1.0, low_open=True)
    device = model_device(model)
    conf, pred = [], []
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            p = F.softmax(model(x[i : i + batch_size].to(device)).float(), 1)
            conf.append(p.gather(1, labels[i : i + batch_size].to(device)[:, None]).squeeze(1).cpu())
            pred.append(p.argmax(1).cpu())
    c, pr = torch.cat(conf), torch.cat(pred)
    return {
        "same_label": float((pr == labels.cpu()).float().mean()),
        "at_threshold": float((c >= threshold).float().mean()),
        "median_confidence": float(c.median()),
        "n": int(c.numel()),
    }
