"""The audit's settings, typed: one frozen dataclass per step, grouped in :class:`AuditSettings`.

``AuditOptions.extra`` (a flat dict of keys such as ``"fooling_threshold"``) is the input form;
:func:`resolve_settings` turns it into an :class:`AuditSettings` at the start of
:func:`guard.audit.run_audit`: each step's defaults come from its ``quick()`` (``--quick``) or
``full()`` (every scaling by the model's cost, :class:`~guard.audit.settings_base.Cost`, is in
these ``full()`` methods), then the caller's keys replace fields, then fields that derive from
others are filled (:meth:`~guard.audit.settings_base.StepSettings.finalized`). An unknown key raises ValueError naming the valid keys
and the closest one; a value of the wrong type raises TypeError naming the key, what was
expected and what came. The resolved settings go to ``report["settings"]``;
``AuditOptions(settings=AuditSettings.from_dict(...))`` (``guard audit --settings report.json``)
runs an audit with exactly those settings.

The tuning constants the defaults rest on (PatchGAN's learning-rate rule, the CPPN settings)
live here, each with the measurement that chose it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from guard.attacks.feature_adversary import VARIANTS
from guard.audit.settings_base import Cost, StepSettings, check_value, setting
from guard.training.harden import HardenConfig

__all__ = [
    "AuditSettings",
    "Cost",
    "GradientSettings",
    "HeldOutSettings",
    "PatchSettings",
    "FeatureSettings",
    "FoolingSettings",
    "DetectorSettings",
    "AdaptiveSettings",
    "RobustSettings",
    "CertifiedSettings",
    "HardenSettings",
    "ExportSettings",
    "resolve_settings",
    "valid_keys",
    "DEFAULT_AREAS",
    "GAN_AUDIT_KWARGS",
    "GAN_REFERENCE_STEPS",
    "GAN_PAPER_LR",
    "GAN_FAST_BETA",
    "gan_learning_rate",
    "gan_diversity_weight",
    "CPPN_HIDDEN",
    "CPPN_ADD_NODE",
    "REFINE_EVERY",
    "REFINE_STEPS",
    "POLISH_REFERENCE",
    "POLISH_MAX",
    "POLISH_STARTS",
]

# ---------------------------------------------------------------- tuning constants

DEFAULT_AREAS = (0.01, 0.02, 0.05, 0.1)

# The diversity setting the audit trains PatchGAN with (measured on the demo model, see
# BENCHMARKS.md, "Attacks I"): the paper's alpha=20 / beta=0.1 with 2-norm L_p gave diverse patches
# (median SSIM ~0) that fooled less (~20% at 10% area vs ~32% here); with these settings the
# patches stay diverse (median SSIM ~0.15) and fool about as well as one universal patch.
GAN_AUDIT_KWARGS: dict[str, Any] = {"alpha": 1.0, "beta": 3.0, "patch_distance": "ssim", "cap_p": 0.8}

#: PatchGAN's step budget on the demo LeNet, where the paper's Adam lr 1e-3 was measured.
GAN_REFERENCE_STEPS = 200
GAN_PAPER_LR = 1e-3

#: PatchGAN's diversity weight where :func:`gan_learning_rate` raises the rate above the paper's.
#: At 5e-3 with the default beta 3 the generator collapsed onto nearly one patch at 10% of the area
#: (median pairwise SSIM 0.93-0.998 on the CIFAR-10 demo, seeds 1 and 2, and a user's ResNet-20
#: module, seed 1; 0.37-0.54 at 1e-3). beta 10, chosen on the demo with seed 1 (the smallest of 10
#: and 30 that brought the median SSIM at 10% under 0.6 while fooling at least as often as 1e-3),
#: kept it at 0.41-0.48 on the other two. BENCHMARKS.md, "PatchGAN's diversity at the raised rate".
GAN_FAST_BETA = 10.0


def gan_learning_rate(steps: int) -> float:
    """The Adam learning rate the audit trains PatchGAN with for a budget of ``steps``.

    The paper's 1e-3 at the LeNet's 200 steps; a shorter budget (the audit scales steps down with
    the model's cost: 40 on the CIFAR-10 ResNet-20) takes proportionally larger steps, so that a
    freshly initialised generator moves as far: ``1e-3 * max(1, 200 / steps)``. At 40 steps (5e-3)
    this fooled 1.2-2.2x as often as 1e-3 at 1-5% of the area on CIFAR-10, on seeds and images the
    audit does not report (``benchmarks/studies/patch_gan_lr.py``, BENCHMARKS.md).
    """
    return GAN_PAPER_LR * max(1.0, GAN_REFERENCE_STEPS / max(int(steps), 1))


def gan_diversity_weight(lr: float, beta: float = GAN_AUDIT_KWARGS["beta"]) -> float:
    """The audit's PatchGAN ``beta`` for Adam rate ``lr``: ``beta`` at the paper's rate, :data:`GAN_FAST_BETA` above it."""
    return max(float(beta), GAN_FAST_BETA) if lr > GAN_PAPER_LR * (1 + 1e-9) else float(beta)


# CPPN settings of the audit, chosen on CIFAR-10 with seed 1 (never reported; the audit runs seed 0),
# 1,500 generations of 30: classes at >= 99.99% were 5/10 with the library's defaults (2 initial hidden
# nodes, add-node rate 0.15, pure evolution), 6/10 with 8 initial hidden nodes and add-node rate 0.3,
# 8/10 with that and Lamarckian refinement (every 100 generations, 100 Adam steps on the weights of
# the elites still short of the threshold, guard.attacks.cppn_refine); 7/10 with 300 steps, 8/10 with
# 16 hidden nodes. BENCHMARKS.md, "CPPN fooling images on CIFAR-10".
CPPN_HIDDEN, CPPN_ADD_NODE, REFINE_EVERY, REFINE_STEPS = 8, 0.3, 100, 100
# The last polish (chosen on seed 1 too, on the archives the settings above leave): the 4 elites
# that give a short class the highest probability, connections completed, 300 Adam steps at lr 0.05
# on the log-odds: seed 1 went from 7/10 to 10/10 (the own elite alone, completed: 10/10; not
# completed: 7/10 with one start, 9/10 with four). 300 steps at the CIFAR-10 ResNet-20's work
# scale (0.095); the step count follows the model's cost below that, so that an ImageNet-size
# model does not spend an hour on it.
POLISH_REFERENCE, POLISH_MAX, POLISH_STARTS = 3200, 300, 4


def _r(cls: type, cost: Cost, name: str, minimum: int = 1) -> int:
    """Field ``name``'s declared default (its size on the demo LeNet) scaled to the model's cost."""
    return cost.scaled(cls.__dataclass_fields__[name].default, minimum)


# ---------------------------------------------------------------- one class per step


@dataclass(frozen=True)
class GradientSettings(StepSettings):
    """Step ``attacks_gradient`` (:mod:`guard.audit.gradient`)."""

    step: ClassVar[str] = "attacks_gradient"
    prefix: ClassVar[str] = "gradient_"
    eps: float = setting(0.3, "L-inf budget of every gradient and held-out row; default the data's", key="eps")
    images: int | None = setting(
        None, "held-out images attacked (None: all; quick: 256 at LeNet cost, scaled, at least 128)"
    )
    steps: int = setting(40, "PGD steps of the three PGD rows")

    @classmethod
    def full(cls, cost: Cost) -> GradientSettings:
        return cls(eps=cost.eps)

    @classmethod
    def quick(cls, cost: Cost) -> GradientSettings:
        return cls(eps=cost.eps, images=cost.scaled(256, 128))


@dataclass(frozen=True)
class HeldOutSettings(StepSettings):
    """Step ``attacks_heldout`` (:mod:`guard.audit.heldout`): torchattacks' budgets. CW runs at Adam's
    rate 0.1, not torchattacks' 0.01: at 0.01 and 50 steps it changed the label of 9% of the demo
    MNIST model's images (0.1: 83%)."""

    step: ClassVar[str] = "attacks_heldout"
    prefix: ClassVar[str] = "heldout_"
    eps: float = setting(0.3, "L-inf budget (the gradient rows'; key shared)", key="eps")
    n: int = setting(500, "held-out images attacked (quick 64)")
    apgd_ce_steps: int = setting(100, "APGD-CE steps (quick 10)")
    apgd_t_steps: int = setting(100, "APGD-T steps per target class (quick 10)")
    square_queries: int = setting(5000, "Square's queries (quick 300; 100 on a costly model)")
    cw_steps: int = setting(100, "CW-L2 Adam steps (quick 50; 20 on a costly model)")
    cw_c: float = setting(1.0, "CW-L2's constant c")
    cw_kappa: float = setting(0.0, "CW-L2's confidence margin kappa")
    cw_lr: float = setting(0.1, "CW-L2's Adam rate")
    deepfool_steps: int = setting(50, "DeepFool steps")
    deepfool_overshoot: float = setting(0.02, "DeepFool's overshoot")
    deepfool_n: int = setting(
        200, "images DeepFool attacks (one backward pass per class each; quick 32; 8 on a costly model)"
    )
    batch_size: int = setting(100, "images per torchattacks call (quick 64)")

    @classmethod
    def full(cls, cost: Cost) -> HeldOutSettings:
        return cls(eps=cost.eps)

    @classmethod
    def quick(cls, cost: Cost) -> HeldOutSettings:
        # on a model costlier than half the LeNet (cost.big) the smoke run queries less: DeepFool's
        # backward pass per class and Square's queries made this step most of a quick audit of a
        # 64-px ResNet-18 (386 s of the run on a loaded two-core machine)
        big = cost.big
        return cls(
            eps=cost.eps,
            n=64,
            apgd_ce_steps=10,
            apgd_t_steps=10,
            square_queries=100 if big else 300,
            cw_steps=20 if big else 50,
            deepfool_n=8 if big else 32,
            batch_size=64,
        )

    def budget(self, name: str) -> dict[str, Any]:
        """The keyword arguments of one attack's budget, as its report entry's ``budget`` lists them."""
        return {
            "apgd_ce": {"steps": self.apgd_ce_steps},
            "apgd_t": {"steps": self.apgd_t_steps},
            "square": {"n_queries": self.square_queries},
            "cw": {"steps": self.cw_steps, "c": self.cw_c, "kappa": self.cw_kappa, "lr": self.cw_lr},
            "deepfool": {"steps": self.deepfool_steps, "overshoot": self.deepfool_overshoot, "n": self.deepfool_n},
        }[name]


@dataclass(frozen=True)
class PatchSettings(StepSettings):
    """Step ``attacks_patches`` (:mod:`guard.audit.patches`). Step counts, no wall-clock caps in a full
    audit: the results do not depend on how busy the machine is."""

    step: ClassVar[str] = "attacks_patches"
    prefix: ClassVar[str] = "patch_"
    areas: tuple[float, ...] = setting(DEFAULT_AREAS, "patch areas of the curve, shares of the image (quick 0.05, 0.2)")
    train_images: int = setting(2000, "training images the patches learn on (quick 256)")
    test_images: int | None = setting(
        None, "held-out images evaluated (None: all at LeNet cost, scaled, at least 1,000; quick 256)"
    )
    repetitions: int = setting(10, "random draws per curve point (default --repetitions, scaled, at least 2; quick 2)")
    gan_steps: int = setting(200, "PatchGAN steps per area (scaled, at least 40; quick 8)")
    gan_seconds: float | None = setting(None, "PatchGAN wall-clock cap per area (None: none; quick 1.5)")
    universal_steps: int = setting(
        200, "UniversalPatch steps per area (scaled, at least 40; quick 8)", key="universal_steps"
    )
    universal_seconds: float | None = setting(
        None, "UniversalPatch wall-clock cap per area (quick 1.0)", key="universal_seconds"
    )
    eval_every: int = setting(25, "steps between validation looks (scaled, at least 10; quick 4)")
    diversity_n: int = setting(100, "patches sampled for the SSIM/PSNR diversity (quick 32)")
    comparison_n: int = setting(500, "images of the class comparison (scaled, at least 200; quick 64)")
    interp_points: int = setting(9, "points of the latent interpolation (quick 3)")
    batch_size: int = setting(64, "training batch (32 on a model at least twice the LeNet's cost)")
    loss: str = setting("margin", "loss of both learned patches: 'margin' or 'paper'")
    gan_kwargs: dict[str, Any] | None = setting(
        None, "PatchGAN diversity settings (None: GAN_AUDIT_KWARGS, beta by gan_diversity_weight)"
    )
    gan_lr: float | None = setting(
        None, "PatchGAN's Adam rate (None: gan_kwargs' lr, else gan_learning_rate(gan_steps))"
    )

    @classmethod
    def full(cls, cost: Cost) -> PatchSettings:
        return cls(
            test_images=min(cost.n_test, cost.scaled(cost.n_test, 1000)),
            repetitions=cost.scaled(cost.repetitions, 2),
            gan_steps=_r(cls, cost, "gan_steps", 40),
            universal_steps=_r(cls, cost, "universal_steps", 40),
            eval_every=_r(cls, cost, "eval_every", 10),
            comparison_n=_r(cls, cost, "comparison_n", 200),
            batch_size=32 if cost.big else 64,
        )

    @classmethod
    def quick(cls, cost: Cost) -> PatchSettings:
        return cls(
            areas=(0.05, 0.2),
            train_images=256,
            test_images=256,
            repetitions=2,
            gan_steps=8,
            gan_seconds=1.5,
            universal_steps=8,
            universal_seconds=1.0,
            eval_every=4,
            diversity_n=32,
            comparison_n=64,
            interp_points=3,
            batch_size=32 if cost.big else 64,
        )

    def finalized(self) -> PatchSettings:
        kw = dict(self.gan_kwargs if self.gan_kwargs is not None else GAN_AUDIT_KWARGS)
        kw_lr = kw.pop("lr", None)  # given once, not twice to PatchGAN
        lr = float(
            self.gan_lr
            if self.gan_lr is not None
            else (kw_lr if kw_lr is not None else gan_learning_rate(self.gan_steps))
        )
        if self.gan_kwargs is None:  # a caller's own kwargs keep their beta
            kw["beta"] = gan_diversity_weight(lr)
        return dataclasses.replace(self, gan_kwargs=kw, gan_lr=lr, areas=tuple(float(a) for a in self.areas))


@dataclass(frozen=True)
class FeatureSettings(StepSettings):
    """Step ``attacks_features`` (:mod:`guard.audit.features`)."""

    step: ClassVar[str] = "attacks_features"
    prefix: ClassVar[str] = "feature_"
    layer: str | None = setting(None, "main layer (None: the deepest curve layer, the head's input)")
    curve_layers: tuple[str, ...] | None = setting(
        None, "layers of the curves (None: the deepest spatial stage and the head's input)"
    )
    curve_main_layer_only: bool = setting(False, "curves at the main layer only (quick True)")
    delta: float = setting(0.3, "L-inf budget of the main run; default the data's")
    n: int = setting(200, "source images of the main run (scaled, at least 100; quick 16)")
    max_iter: int = setting(50, "L-BFGS-B iterations of the main run (quick 8)")
    full_curves: bool = setting(False, "curves on n images with max_iter iterations", key="feature_full")
    curve_deltas: tuple[float, ...] | None = setting(
        None, "budgets of the curves (the data's; quick None: the main delta only)"
    )
    curve_n: int = setting(24, "source images of the curves (scaled, at least 16; quick 8)")
    curve_max_iter: int = setting(25, "iterations of the curves (quick 5)")
    curve_variants: tuple[str, ...] = setting(tuple(VARIANTS), "variants of the curves (quick lbfgs and feature-fgrad)")
    representation_images: int | None = setting(None, "training images of the kNN references (None: all; quick 1,000)")

    @classmethod
    def full(cls, cost: Cost) -> FeatureSettings:
        return cls(
            delta=cost.feature_delta,
            n=_r(cls, cost, "n", 100),
            curve_deltas=tuple(cost.feature_deltas),
            curve_n=_r(cls, cost, "curve_n", 16),
        )

    @classmethod
    def quick(cls, cost: Cost) -> FeatureSettings:
        return cls(
            delta=cost.feature_delta,
            n=16,
            max_iter=8,
            curve_main_layer_only=True,
            curve_deltas=None,
            curve_n=8,
            curve_max_iter=5,
            curve_variants=("lbfgs", "feature-fgrad"),
            representation_images=1000,
        )

    def finalized(self) -> FeatureSettings:
        out = self if self.curve_deltas is not None else dataclasses.replace(self, curve_deltas=(self.delta,))
        if out.full_curves:
            out = dataclasses.replace(out, curve_n=out.n, curve_max_iter=out.max_iter)
        return out


@dataclass(frozen=True)
class FoolingSettings(StepSettings):
    """Step ``attacks_fooling`` (:mod:`guard.audit.fooling`)."""

    step: ClassVar[str] = "attacks_fooling"
    prefix: ClassVar[str] = "fooling_"
    threshold: float = setting(0.9999, "confidence an image needs to count as fooling")
    classes: int = setting(100, "classes attacked at most (a seeded sample beyond; quick 10)")
    grad_steps: int = setting(300, "gradient-ascent steps (quick 20)")
    grad_samples: int = setting(10, "gradient-ascent images per class (scaled, at least 2; quick 2)")
    grad_lr: float = setting(0.1, "gradient-ascent rate")
    grad_batch_size: int | None = setting(
        None, "gradient-ascent batch (None: all at once; 32 on a model at least twice the LeNet's cost)"
    )
    population: int = setting(100, "evolution children per generation (scaled, at least 30; quick 20)")
    generations: int = setting(1500, "evolution generations at most, both encodings (quick 5)")
    extra_generations: int = setting(100, "generations after every class is fooled, for extra positives (quick 0)")
    extra_samples: int = setting(100, "extra images at the threshold handed to the detectors (quick 20)")
    selection: str = setting("unfooled", "parents: 'unfooled' (classes still short) or 'uniform' (the paper's)")
    cppn_hidden: int = setting(CPPN_HIDDEN, "initial hidden nodes per CPPN")
    cppn_add_node: float = setting(CPPN_ADD_NODE, "CPPN add-node mutation rate")
    refine_every: int = setting(
        REFINE_EVERY, "generations between Lamarckian refinements of the CPPN elites (0: pure evolution)"
    )
    refine_steps: int = setting(REFINE_STEPS, "Adam steps of each refinement")
    polish_steps: int = setting(
        POLISH_MAX, "last polish's steps (min(300, 3200 x work scale), at least 20; quick 20; 0: none)"
    )
    polish_starts: int = setting(POLISH_STARTS, "elites the last polish starts from")
    transfer: bool = setting(True, "label the images with a second, independently trained model")
    transfer_epochs: int = setting(1, "epochs of that second model", key="transfer_epochs")

    @classmethod
    def full(cls, cost: Cost) -> FoolingSettings:
        return cls(
            grad_samples=_r(cls, cost, "grad_samples", 2),
            grad_batch_size=32 if cost.big else None,
            population=_r(cls, cost, "population", 30),
            polish_steps=min(POLISH_MAX, cost.scaled(POLISH_REFERENCE, 20)),
        )

    @classmethod
    def quick(cls, cost: Cost) -> FoolingSettings:
        return cls(
            classes=10,
            grad_steps=20,
            grad_samples=2,
            grad_batch_size=32 if cost.big else None,
            population=20,
            generations=5,
            extra_generations=0,
            extra_samples=20,
            polish_steps=20,
        )


@dataclass(frozen=True)
class DetectorSettings(StepSettings):
    """Step ``detectors`` (:mod:`guard.audit.detectors`). The combined flag's rule ``"weighted"``:
    per-detector weights learned by logistic regression on clean calibration images vs proxy
    inputs (noise, blur, occlusion, sign noise), never on an attack that is reported; chosen over
    "max" and "fisher" on those proxies (``benchmarks/studies/combiner_study.py``), anchors in the flag."""

    step: ClassVar[str] = "detectors"
    prefix: ClassVar[str] = "detectors_"
    combine: str = setting("weighted", "the combined flag's rule", key="combine")
    flag_with: str | None = setting(
        None, "None: every detector feeds the flag; 'own': the anchors stay out", key="flag_with"
    )
    train_images: int | None = setting(
        None, "training images the detectors fit on (None: all; quick 1,000, a seeded sample)"
    )
    calibration_images: int | None = setting(None, "images of each held-out half (None: all; quick 256)")
    per_layer_knn: bool = setting(True, "the per-layer kNN view (quick False)")

    @classmethod
    def quick(cls, cost: Cost) -> DetectorSettings:
        return cls(train_images=1000, calibration_images=256, per_layer_knn=False)

    def finalized(self) -> DetectorSettings:
        if self.flag_with not in (None, "own"):
            raise ValueError(f"options.extra['flag_with'] must be None or 'own'; got {self.flag_with!r}.")
        return self


@dataclass(frozen=True)
class AdaptiveSettings(StepSettings):
    """Step ``adaptive`` (:mod:`guard.audit.adaptive`)."""

    step: ClassVar[str] = "adaptive"
    prefix: ClassVar[str] = "adaptive_"
    enabled: bool = setting(True, "run the step", key="adaptive")
    n: int = setting(200, "images attacked (scaled, at least 64; quick 16)")
    steps: int = setting(50, "attack steps (scaled, at least 20; quick 10)")
    restarts: int = setting(2, "restarts (quick 1)")
    eps: tuple[float, ...] | float | None = setting(
        None, "budgets (None: the data's three; quick: its headline budget)"
    )
    weights: tuple[float, ...] | None = setting(None, "detector weights swept (None: 0.1, 1, 10; quick 1)")
    members: tuple[str, ...] | None = setting(None, "AdaptiveEnsemble members (None: all)")
    headline_only: bool = setting(False, "with eps None: the data's headline budget only (quick True)")

    @classmethod
    def full(cls, cost: Cost) -> AdaptiveSettings:
        return cls(n=_r(cls, cost, "n", 64), steps=_r(cls, cost, "steps", 20))

    @classmethod
    def quick(cls, cost: Cost) -> AdaptiveSettings:
        return cls(n=16, steps=10, restarts=1, weights=(1.0,), headline_only=True)


@dataclass(frozen=True)
class RobustSettings(StepSettings):
    """Step ``robust`` (:mod:`guard.audit.robust`)."""

    step: ClassVar[str] = "robust"
    prefix: ClassVar[str] = "robust_"
    enabled: bool = setting(True, "run the step", key="robust")
    eps: float = setting(0.3, "L-inf budget (default options.extra['eps'], else the data's)")
    n: int = setting(200, "images (scaled, at least 32; quick 16)")
    budget: str = setting(
        "audit", "'quick', 'audit' (AutoAttack's steps, 3 targets, 1,000 queries) or 'standard' (quick 'quick')"
    )
    restarts: int | None = setting(None, "restarts (None: the budget's)")
    sweep: bool = setting(True, "the cheaper sweep over eps")

    @classmethod
    def full(cls, cost: Cost) -> RobustSettings:
        return cls(eps=cost.eps, n=_r(cls, cost, "n", 32))

    @classmethod
    def quick(cls, cost: Cost) -> RobustSettings:
        return cls(eps=cost.eps, n=16, budget="quick")


@dataclass(frozen=True)
class CertifiedSettings(StepSettings):
    """Step ``certified`` (:mod:`guard.audit.certified`)."""

    step: ClassVar[str] = "certified"
    prefix: ClassVar[str] = "certified_"
    enabled: bool = setting(True, "run the step", key="certified")
    n: int = setting(100, "images (scaled, at least 20; quick 16)")
    patch_area: float = setting(0.024, "the certified patch's share of the image (a 5x5 patch on 32x32)")
    k: int = setting(6, "masks per axis (quick 3)")

    @classmethod
    def full(cls, cost: Cost) -> CertifiedSettings:
        return cls(n=_r(cls, cost, "n", 20))

    @classmethod
    def quick(cls, cost: Cost) -> CertifiedSettings:
        return cls(n=16, k=3)


@dataclass(frozen=True)
class ExportSettings(StepSettings):
    """Step ``export`` (:mod:`guard.audit.export`)."""

    step: ClassVar[str] = "export"
    prefix: ClassVar[str] = "export_"
    eval_images: int | None = setting(None, "held-out images of the parity check (None: all; quick 256)")
    attack_images: int = setting(500, "images per attack set of the parity check (quick 64)")
    refit_train_images: int | None = setting(
        None, "training images the hardened model's detectors refit on (quick 1,000)"
    )
    refit_calibration_images: int = setting(1000, "their calibration images (quick 256)")
    latency_batch: int = setting(256, "the large latency batch, or fewer for large images (quick 64)")
    latency_repeats_one: int = setting(20, "timed repeats at batch 1 (quick 3)")
    latency_repeats: int = setting(5, "timed repeats at the large batch (quick 3)")

    @classmethod
    def quick(cls, cost: Cost) -> ExportSettings:
        return cls(
            eval_images=256,
            attack_images=64,
            refit_train_images=1000,
            refit_calibration_images=256,
            latency_batch=64,
            latency_repeats_one=3,
            latency_repeats=3,
        )


@dataclass(frozen=True)
class HardenSettings:
    """Step ``harden`` (:mod:`guard.audit.harden`): :class:`~guard.training.HardenConfig` (its quick
    settings in quick mode) with the audit's seed and any field given as ``harden_<field>``."""

    step: ClassVar[str] = "harden"
    prefix: ClassVar[str] = "harden_"
    config: HardenConfig = dataclasses.field(default_factory=HardenConfig)
    train_images: int | None = None
    test_images: int | None = None

    #: the step's own keys besides HardenConfig's fields
    OWN: ClassVar[dict[str, str]] = {
        "train_images": "training images (None: all; quick 500)",
        "test_images": "held-out images (None: all; quick 300)",
    }

    @classmethod
    def keys(cls) -> dict[str, str]:
        names = [f.name for f in dataclasses.fields(HardenConfig)] + list(cls.OWN)
        return {cls.prefix + n: n for n in names}

    @classmethod
    def resolve(cls, given: Mapping[str, Any], *, quick: bool, seed: int) -> HardenSettings:
        hints = _hints(HardenConfig)
        own_hints = {"train_images": int | None, "test_images": int | None}
        fields = {}
        own: dict[str, Any] = {"train_images": 500, "test_images": 300} if quick else {}
        for key, value in given.items():
            name = key[len(cls.prefix) :]
            if name in cls.OWN:
                own[name] = check_value(key, value, own_hints[name])
            else:
                fields[name] = check_value(key, value, hints[name])
        base = HardenConfig.quick() if quick else HardenConfig()
        return cls(dataclasses.replace(base, **{"seed": seed, **fields}), **own)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "train_images": self.train_images, "test_images": self.test_images}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HardenSettings:
        unknown = sorted(set(d) - {"config", "train_images", "test_images"})
        if unknown:
            raise ValueError(f"unknown harden setting(s) {unknown}; expected config, train_images, test_images.")
        hints = _hints(HardenConfig)
        cfg = {
            k: check_value(f"harden_{k}", v, hints[k]) if k in hints else v
            for k, v in dict(d.get("config") or {}).items()
        }
        return cls(HardenConfig(**cfg), d.get("train_images"), d.get("test_images"))


def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


# ---------------------------------------------------------------- the whole audit

_STEPS: dict[str, type] = {
    "gradient": GradientSettings,
    "heldout": HeldOutSettings,
    "patches": PatchSettings,
    "features": FeatureSettings,
    "fooling": FoolingSettings,
    "detectors": DetectorSettings,
    "adaptive": AdaptiveSettings,
    "robust": RobustSettings,
    "certified": CertifiedSettings,
    "harden": HardenSettings,
    "export": ExportSettings,
}


@dataclass(frozen=True)
class AuditSettings:
    """Every step's resolved settings (``report["settings"]["steps"]``)."""

    gradient: GradientSettings = dataclasses.field(default_factory=GradientSettings)
    heldout: HeldOutSettings = dataclasses.field(default_factory=HeldOutSettings)
    patches: PatchSettings = dataclasses.field(default_factory=PatchSettings)
    features: FeatureSettings = dataclasses.field(default_factory=FeatureSettings)
    fooling: FoolingSettings = dataclasses.field(default_factory=FoolingSettings)
    detectors: DetectorSettings = dataclasses.field(default_factory=DetectorSettings)
    adaptive: AdaptiveSettings = dataclasses.field(default_factory=AdaptiveSettings)
    robust: RobustSettings = dataclasses.field(default_factory=RobustSettings)
    certified: CertifiedSettings = dataclasses.field(default_factory=CertifiedSettings)
    harden: HardenSettings = dataclasses.field(default_factory=HardenSettings)
    export: ExportSettings = dataclasses.field(default_factory=ExportSettings)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in _STEPS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditSettings:
        """From :meth:`to_dict`'s form (a report's ``report["settings"]["steps"]``): every step, each field checked."""
        if not isinstance(d, Mapping):
            raise TypeError(f"settings must be a dict of step -> settings; got {type(d).__name__}.")
        unknown, missing = sorted(set(d) - set(_STEPS)), [s for s in _STEPS if s not in d]
        if unknown or missing:
            raise ValueError(
                f"settings must hold exactly the steps {list(_STEPS)}; unknown {unknown}, missing {missing}."
            )
        return cls(**{name: _STEPS[name].from_dict(v) for name, v in d.items()})  # type: ignore[attr-defined]


def valid_keys() -> dict[str, list[tuple[str, str]]]:
    """Every ``options.extra`` key -> the (step group, field) pairs it sets."""
    out: dict[str, list[tuple[str, str]]] = {}
    for group, cls in _STEPS.items():
        for key, name in cls.keys().items():  # type: ignore[attr-defined]
            out.setdefault(key, []).append((group, name))
    return out


def resolve_settings(extra: Mapping[str, Any], *, quick: bool, seed: int, cost: Cost) -> AuditSettings:
    """``options.extra`` resolved into typed settings: quick or full defaults at ``cost``, the keys, derived fields.

    Raises:
        ValueError: an unknown key (naming the valid keys and the closest one), or a bad value.
        TypeError: ``extra`` not a dict with str keys, or a value of the wrong type.
    """
    if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
        raise TypeError(f"options.extra must be a dict of str keys; got {type(extra).__name__}.")
    keys = valid_keys()
    unknown = [k for k in extra if k not in keys]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(keys), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown audit option options.extra[{k!r}].{hint} Valid keys: {sorted(keys)}.")
    if "eps" in extra:  # the shared budget: the gradient and held-out rows, and robust's default
        cost = dataclasses.replace(cost, eps=check_value("eps", extra["eps"], float))
    groups: dict[str, dict[str, Any]] = {g: {} for g in _STEPS}
    given: dict[str, dict[str, Any]] = {g: {} for g in _STEPS}
    for key, value in extra.items():
        for group, name in keys[key]:
            groups[group][name] = value
            given[group][key] = value
    out: dict[str, Any] = {}
    for group, cls in _STEPS.items():
        if cls is HardenSettings:
            out[group] = HardenSettings.resolve(given[group], quick=quick, seed=seed)
            continue
        base = cls.quick(cost) if quick else cls.full(cost)  # type: ignore[attr-defined]
        hints = cls.hints()  # type: ignore[attr-defined]
        names = {v: k for k, v in cls.keys().items()}  # type: ignore[attr-defined]
        overrides = {name: check_value(names[name], v, hints[name]) for name, v in groups[group].items()}
        out[group] = dataclasses.replace(base, **overrides).validated().finalized()
    return AuditSettings(**out)
