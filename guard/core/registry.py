"""The one vocabulary: every named attack and detector that report.json, the page and hardening use.

An audit step writes ``report["attacks"][NAME]`` and ``report["detectors"][DETECTOR][ATTACK]``;
the page (:mod:`guard.report`) titles them; the hardening round table
(:mod:`guard.training.round_attacks`) runs some of the same attacks by the same names. All of
them read the names and their properties here instead of spelling them out, so that a new
attack is one line in :data:`ATTACK_INFO` and a misspelt name fails (:func:`attack`,
:func:`check_report_names`) instead of vanishing from a table. A small registry in the manner
of timm's ``timm/models/_registry.py`` (``list_models``): names and facts only, no classes, so
that every layer (the page included, which imports only ``guard.core``) may read it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AttackInfo",
    "DetectorInfo",
    "ATTACK_INFO",
    "DETECTOR_INFO",
    "COMBINED",
    "attack",
    "detector",
    "attack_names",
    "detector_names",
    "check_report_names",
]


@dataclass(frozen=True)
class AttackInfo:
    """One named attack of report.json.

    Attributes:
        name: the report key (``report["attacks"][name]``, artifact ``attack_<name>``).
        title: how report.html names it in sentences and headings.
        short: its name in plot titles and table columns.
        kind: ``"gradient"``, ``"patch"``, ``"feature"`` or ``"fooling"`` (which family it belongs to).
        strength: the row's strength (``"minimal"``, ``"full"``, ``"confident"``, ``"minimal-norm"``;
            report entry field ``strength``), None where the attack has no strength axis.
        step: the audit step that writes it (:data:`guard.audit.steps.STEPS`).
        held_out: True for the peer attacks guard was never tuned on (torchattacks).
        round_attack: hardening's round table (:func:`guard.training.round_attacks.round_attack_table`)
            runs an attack of this name too.
        implementation: the class that runs it in the audit (``module.Class``).
    """

    name: str
    title: str
    short: str
    kind: str
    strength: str | None
    step: str
    held_out: bool
    round_attack: bool
    implementation: str


@dataclass(frozen=True)
class DetectorInfo:
    """One named detector of report.json (``report["detectors"][name]``).

    Attributes:
        name: the report key; also ``guard.detectors.DETECTORS``' key (``"combined"`` excepted).
        title: its name in sentences.
        role: ``"own"`` (guard's detectors, in ``guard.wrap``'s default set), ``"anchor"`` (a
            published detector guard is measured against), ``"optional"`` (never a default) or
            ``"combined"`` (the one flag the others are merged into).
        in_audit: the audit's detectors step fits and reports it.
    """

    name: str
    title: str
    role: str
    in_audit: bool


def _a(
    name: str,
    title: str,
    short: str,
    kind: str,
    strength: str | None,
    step: str,
    implementation: str,
    *,
    held_out: bool = False,
    round_attack: bool = False,
) -> AttackInfo:
    return AttackInfo(name, title, short, kind, strength, step, held_out, round_attack, implementation)


#: Every attack name of report.json, in the audit's order.
ATTACK_INFO: tuple[AttackInfo, ...] = (
    _a("fgsm", "FGSM", "FGSM", "gradient", "full", "attacks_gradient", "guard.attacks.FGSM"),
    _a(
        "pgd_minimal",
        "PGD early-stopped",
        "PGD min.",
        "gradient",
        "minimal",
        "attacks_gradient",
        "guard.attacks.LinfPGD",
    ),
    _a("pgd", "PGD-40", "PGD", "gradient", "full", "attacks_gradient", "guard.attacks.LinfPGD", round_attack=True),
    _a(
        "pgd_confident",
        "PGD-40 confidence-maximising",
        "PGD conf.",
        "gradient",
        "confident",
        "attacks_gradient",
        "guard.attacks.LinfPGD",
    ),
    _a("apgd_ce", "APGD-CE", "APGD-CE", "gradient", "full", "attacks_heldout", "torchattacks.APGD", held_out=True),
    _a("apgd_t", "APGD-T", "APGD-T", "gradient", "full", "attacks_heldout", "torchattacks.APGDT", held_out=True),
    _a("square", "Square", "Square", "gradient", "minimal", "attacks_heldout", "torchattacks.Square", held_out=True),
    _a("cw", "CW-L2", "CW-L2", "gradient", "minimal-norm", "attacks_heldout", "torchattacks.CW", held_out=True),
    _a(
        "deepfool",
        "DeepFool",
        "DeepFool",
        "gradient",
        "minimal-norm",
        "attacks_heldout",
        "torchattacks.DeepFool",
        held_out=True,
    ),
    _a("patch_gan", "PatchGAN patches", "PatchGAN", "patch", None, "attacks_patches", "guard.attacks.PatchGAN"),
    _a(
        "universal_patch",
        "universal patch",
        "universal patch",
        "patch",
        None,
        "attacks_patches",
        "guard.attacks.UniversalPatch",
        round_attack=True,
    ),
    _a(
        "random_patch",
        "random noise patch",
        "random patch",
        "patch",
        None,
        "attacks_patches",
        "guard.attacks.RandomPatch",
        round_attack=True,
    ),
    _a(
        "feature_adversary",
        "feature adversaries",
        "feature adv.",
        "feature",
        None,
        "attacks_features",
        "guard.attacks.FeatureAdversary",
    ),
    _a(
        "fooling_gradient",
        "fooling images (gradient ascent)",
        "fooling (gradient)",
        "fooling",
        None,
        "attacks_fooling",
        "guard.attacks.FoolingGradient",
        round_attack=True,
    ),
    _a(
        "fooling_direct",
        "fooling images (direct encoding)",
        "fooling (direct)",
        "fooling",
        None,
        "attacks_fooling",
        "guard.attacks.FoolingEvolution",
        round_attack=True,
    ),
    _a(
        "fooling_cppn",
        "fooling images (CPPN encoding)",
        "fooling (CPPN)",
        "fooling",
        None,
        "attacks_fooling",
        "guard.attacks.FoolingEvolution",
        round_attack=True,
    ),
)

#: The combined flag's name in ``report["detectors"]``.
COMBINED = "combined"

#: Every detector name of report.json, in the order ``guard.wrap`` and the audit build them.
DETECTOR_INFO: tuple[DetectorInfo, ...] = (
    DetectorInfo("saliency", "saliency concentration", "own", True),
    DetectorInfo("knn", "kNN rank", "own", True),
    DetectorInfo("ppca", "PPCA in-manifold likelihood", "own", True),
    DetectorInfo("knn_consistency", "kNN label consistency", "own", True),
    DetectorInfo("squeeze", "feature squeezing", "own", True),
    DetectorInfo("mahalanobis", "Mahalanobis (Lee et al. 2018)", "anchor", True),
    DetectorInfo("lid", "LID (Ma et al. 2018)", "anchor", True),
    DetectorInfo("masking", "PatchCleanser masking", "optional", False),
    DetectorInfo("occlusion", "salient-window occlusion (SentiNet)", "optional", False),
    DetectorInfo(COMBINED, "combined flag", "combined", True),
)

_ATTACKS = {a.name: a for a in ATTACK_INFO}
_DETECTORS = {d.name: d for d in DETECTOR_INFO}


def _unknown(what: str, name: Any, known: Mapping[str, Any]) -> ValueError:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {what} name {name!r}; expected one of {list(known)} (guard.core.registry).{hint}")


def attack(name: str) -> AttackInfo:
    """The registered attack called ``name`` (ValueError naming the known names and the closest one)."""
    if not isinstance(name, str):
        raise TypeError(f"an attack name must be a str; got {type(name).__name__}.")
    if name not in _ATTACKS:
        raise _unknown("attack", name, _ATTACKS)
    return _ATTACKS[name]


def detector(name: str) -> DetectorInfo:
    """The registered detector called ``name`` (ValueError naming the known names and the closest one)."""
    if not isinstance(name, str):
        raise TypeError(f"a detector name must be a str; got {type(name).__name__}.")
    if name not in _DETECTORS:
        raise _unknown("detector", name, _DETECTORS)
    return _DETECTORS[name]


def attack_names(
    *, kind: str | None = None, step: str | None = None, held_out: bool | None = None, round_attack: bool | None = None
) -> tuple[str, ...]:
    """Registered attack names (in the audit's order) that match every given property."""
    return tuple(
        a.name
        for a in ATTACK_INFO
        if (kind is None or a.kind == kind)
        and (step is None or a.step == step)
        and (held_out is None or a.held_out == held_out)
        and (round_attack is None or a.round_attack == round_attack)
    )


def detector_names(*, role: str | None = None, in_audit: bool | None = None) -> tuple[str, ...]:
    """Registered detector names (in ``guard.wrap``'s order) that match every given property."""
    return tuple(
        d.name
        for d in DETECTOR_INFO
        if (role is None or d.role == role) and (in_audit is None or d.in_audit == in_audit)
    )


def check_report_names(report: Mapping[str, Any]) -> None:
    """Every attack and detector name a report uses is registered: ``report["attacks"]`` keys,
    ``report["detectors"]`` keys and their attack keys (ValueError on the first that is not)."""
    for name in report.get("attacks") or {}:
        attack(name)
    for det, per_attack in (report.get("detectors") or {}).items():
        detector(det)
        for name in per_attack if isinstance(per_attack, dict) else {}:
            attack(name)
