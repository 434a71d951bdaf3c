"""The report.json format: its version and, as TypedDicts, every key the audit writes.

``guard.audit`` writes report.json (and re-exports :data:`REPORT_VERSION` as
``guard.audit.step.REPORT_VERSION``); :mod:`guard.report` reads it. The reader sits below the
writer in the import layers, so the format lives with the reader. Bump the version when a key is
renamed or changes meaning (adding keys does not need a bump): a page builder then refuses a
report newer than it understands instead of drawing it wrongly.

:class:`Report` is the top level; each section has its TypedDict (``total=False`` where a key
may be absent). Maps keyed by a name (an attack, a detector, a step, a layer) are
``dict[str, T]``. A few parts are free-form by design and typed ``dict[str, Any]``: an
attack's or detector's ``params`` (each class's own constructor arguments), the per-step
settings (owned by :mod:`guard.audit.settings`, which checks them itself) and the harden
section's measurements of :mod:`guard.training`. :func:`unknown_keys` walks a report against
these types, so that a key written under a new or misspelt name fails a test
(tests/test_report_schema.py) instead of silently missing the page.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, TypedDict, Union, get_args, get_origin, get_type_hints, is_typeddict

__all__ = ["REPORT_VERSION", "Report", "unknown_keys"]

REPORT_VERSION = 1


# -- shared shapes


class Rate(TypedDict):
    """k of n with its exact 95% Clopper-Pearson interval."""

    rate: float | None
    k: int
    n: int
    ci95: list[float]


class Percentiles(TypedDict):
    """Median, 10th and 90th percentile and mean of a per-image figure."""

    median: float
    p10: float
    p90: float
    mean: float


# -- options, settings, defaults, model


class Options(TypedDict):
    """``options``: the knobs of the run (:class:`guard.audit.AuditOptions`)."""

    seed: int
    quick: bool
    harden: bool
    export: bool
    repetitions: int
    device: str


class Settings(Options):
    """``settings``: the options, the threads and every step's resolved settings."""

    threads: int
    #: step -> its settings: the fields of guard.audit.settings' classes, which check them (free-form here)
    steps: dict[str, dict[str, Any]]


class Defaults(TypedDict, total=False):
    """``defaults``: what the steps derived from the data and the model's cost."""

    kind: str
    saturated_share: float
    eps: float
    feature_delta: float
    feature_deltas: list[float]
    macs_per_image: float
    work_scale: float


class DataInfo(TypedDict):
    source: str
    train: int
    test: int


class ModelCache(TypedDict, total=False):
    """Where a demo model came from (the keys its ``guard_meta`` has)."""

    cache_path: str
    cache_hit: bool
    key: str


class ModelSection(TypedDict, total=False):
    """``model``: the audited classifier and its clean accuracy."""

    name: str
    num_classes: int
    clean_accuracy: float
    train_accuracy: float
    train_accuracy_n: int
    data: DataInfo
    parameters: int
    cache: ModelCache


# -- attacks: one entry type; each attack step fills the keys of its kind


class PatchCurvePoint(TypedDict, total=False):
    area: float
    side: int | None
    mean: float
    std: float
    rates: list[float]
    n: int
    mean_correct: float
    std_correct: float
    n_correct: int
    fit_seconds: float
    fit_steps: int
    val_fooling_rate: float


class ClassComparison(TypedDict, total=False):
    positions: int
    stride: int
    pairs: int
    patched_takes_canvas_class: float
    fooled_takes_canvas_class: float
    fooling_rate: float
    fooling_rate_per_position: list[float]


class PatchDiversity(TypedDict, total=False):
    n_patches: int
    n_pairs: int
    ssim_median: float
    ssim_mean: float
    psnr_median: float
    psnr_mean: float
    identical_pairs: int


class LatentInterpolation(TypedDict, total=False):
    t: list[float]
    fooling_rate: list[float]
    min: float
    max: float
    mean: float


class PatchSummary(TypedDict, total=False):
    """Under ``attacks.patch_gan.summary``: PatchGAN against both baselines, per area (``str(area)``)."""

    patch_gan_above_both_baselines: dict[str, bool]
    patch_gan_above_both_at_every_area: bool
    patch_gan_best_fooling_at_area_le_10pct: float


class Representation(TypedDict, total=False):
    """``attacks.feature_adversary.representation``: the layer's view of the adversaries."""

    n: int
    n_without_reference: int
    guide_label_agreement: float
    distance_ratio: Percentiles
    sparsity_adv: Percentiles
    sparsity_source: Percentiles
    sparsity_guide: Percentiles
    iou_adv_source: Percentiles
    iou_adv_guide: Percentiles
    nn_intersection: Percentiles
    rank_adv: Percentiles
    rank_guide: Percentiles
    rank_difference: Percentiles


class FeatureCurvePoint(TypedDict, total=False):
    guide_label_agreement: float
    distance_ratio: Percentiles
    objective_decrease: Percentiles
    iterations: list[int]
    seconds: float


class FeatureCurves(TypedDict, total=False):
    n: int
    max_iter: int
    guides: str
    #: layer -> variant -> str(delta) -> figures
    by_layer: dict[str, dict[str, dict[str, FeatureCurvePoint]]]


class FoolingHistoryRow(TypedDict, total=False):
    generation: int
    classes_fooled: int
    classes_filled: int
    median_confidence: float
    seconds: float


class FoolingTransfer(TypedDict, total=False):
    same_label: float
    at_threshold: float
    median_confidence: float
    n: int
    second_model: str


class AttackCommon(TypedDict, total=False):
    """The keys every attack entry has (or may have): the success rate and how it was measured."""

    success_rate: float
    n: int
    success_rate_on_correct: float
    n_correct: int
    success_definition: str
    seconds: float
    #: the attack's constructor arguments (each attack's own; free-form by design)
    params: dict[str, Any]
    strength: str
    held_out: bool
    #: the held-out peer attacks' budget, in words
    budget: str


class GradientFigures(TypedDict, total=False):
    """Distances and confidences of the successful examples (gradient and held-out attacks)."""

    linf_max: float | None
    wrong_confidence_median: float
    wrong_confidence_mean: float
    linf_median: float
    l2_median: float
    mean_steps_taken: float


class PatchFigures(TypedDict, total=False):
    """``attacks.patch_gan``, ``universal_patch``, ``random_patch``."""

    area: float
    side: int
    curve: list[PatchCurvePoint]
    curve_repetitions: int
    curve_training: str
    class_comparison: ClassComparison
    diversity: PatchDiversity
    latent_interpolation: LatentInterpolation
    summary: PatchSummary


class FeatureFigures(TypedDict, total=False):
    """``attacks.feature_adversary``."""

    layer: str
    delta: float
    guides: str
    guide_label_agreement: float
    distance_ratio: Percentiles
    representation: Representation
    curves: FeatureCurves
    curves_seconds: float


class FoolingFigures(TypedDict, total=False):
    """``attacks.fooling_gradient``, ``fooling_direct``, ``fooling_cppn``."""

    classes_attacked: int
    classes_fooled: list[int]
    median_confidence: float
    min_confidence: float
    image_success_rate: float
    threshold: float
    steps: int
    generations: int
    images_at_threshold: int
    generation_all_fooled: int
    evaluations: int
    refine_evaluations: int
    history: list[FoolingHistoryRow]
    classes_fooled_before_polish: list[int]
    min_confidence_before_polish: float
    polish_evaluations: int
    transfer: FoolingTransfer


class AttackEntry(AttackCommon, GradientFigures, PatchFigures, FeatureFigures, FoolingFigures, total=False):
    """``attacks[NAME]``: the common keys and those of the attack's kind."""


# -- detectors


class OperatingPoint(TypedDict, total=False):
    """The realised rates at the calibrated threshold (a side with no images: None)."""

    threshold: float
    tpr: Rate | None
    fpr: Rate | None
    target_fpr: float | None
    n_calibration: int | None
    clean_disjoint_from_calibration: bool


class DetectionFigures(TypedDict, total=False):
    auroc: float | None
    tpr_at_1fpr: float | None
    tpr_at_5fpr: float | None
    tpr_at_threshold: float | None
    fpr_at_threshold: float | None
    n_pos: int
    n_neg: int
    operating_point: OperatingPoint


class DetectionMetrics(DetectionFigures, total=False):
    """``detectors[DETECTOR][ATTACK]``: on the successful adversarials, and under ``all`` on every one."""

    all: DetectionFigures


#: ``detectors_info.detectors[DETECTOR]`` ("class" is a keyword, hence the functional form)
DetectorInfo = TypedDict(
    "DetectorInfo",
    {
        "class": str,
        "params": dict[str, Any],  # the detector's constructor arguments (free-form by design)
        "layers": dict[str, int | None],
        "threshold": float | None,
    },
    total=False,
)


class CombinedInfo(TypedDict, total=False):
    rule: str
    detectors: list[str]
    weights: list[float]
    threshold: float | None
    anchors_not_in_the_flag: list[str]


class FitInfo(TypedDict, total=False):
    n_train: int
    labels: str


class CalibrationInfo(TypedDict, total=False):
    target_fpr: float
    n_calibration: int
    n_evaluation: int
    split: str


class CleanOperatingPoint(TypedDict, total=False):
    target_fpr: float
    clean_fpr: dict[str, Rate]
    rule: str


class LayerKnn(TypedDict, total=False):
    auroc: float | None
    tpr_at_1fpr: float | None
    n_pos: int


class DetectorSeconds(TypedDict, total=False):
    fit: float
    calibrate: float
    evaluate: float
    total: float


class DetectorsInfo(TypedDict, total=False):
    """``detectors_info``: the fitted detectors, the split, the clean flag rates, timings."""

    detectors: dict[str, DetectorInfo]
    feature_layers: list[str]
    pool: str
    left_out: dict[str, str]
    combined: CombinedInfo
    fit: FitInfo
    calibration: CalibrationInfo
    clean_flag_rate: dict[str, float]
    operating_point: CleanOperatingPoint
    clean_flag_rate_swapped_halves: dict[str, float]
    clean_flag_rate_mean_of_both: dict[str, float]
    clean_accuracy_bare: float
    clean_accuracy_wrapped: float
    predictions_identical: bool
    #: layer -> attack -> figures
    knn_per_layer: dict[str, dict[str, LayerKnn]]
    attacks_evaluated: list[str]
    seconds: DetectorSeconds
    sha256: str
    signed: bool


# -- adaptive, robust, certified


class MemberFigures(TypedDict, total=False):
    evasion: float
    misclassified: float
    kept: int


class AdaptiveAtEps(TypedDict, total=False):
    """``adaptive.per_eps[i]``: each rate with its ``_ci95`` interval and ``_k`` count."""

    eps: float
    n: int
    n_correct: int
    evasion: float | None
    evasion_ci95: list[float]
    evasion_k: int
    evasion_correct: float | None
    evasion_correct_ci95: list[float]
    evasion_correct_k: int
    misclassified: float | None
    misclassified_ci95: list[float]
    misclassified_k: int
    flagged: float | None
    flagged_ci95: list[float]
    flagged_k: int
    oblivious_evasion: float | None
    oblivious_evasion_ci95: list[float]
    oblivious_evasion_k: int
    oblivious_evasion_correct: float | None
    oblivious_evasion_correct_ci95: list[float]
    oblivious_evasion_correct_k: int
    oblivious_misclassified: float | None
    oblivious_misclassified_ci95: list[float]
    oblivious_misclassified_k: int
    oblivious_full_evasion: float | None
    oblivious_full_evasion_ci95: list[float]
    oblivious_full_evasion_k: int
    oblivious_full_misclassified: float | None
    oblivious_full_misclassified_ci95: list[float]
    oblivious_full_misclassified_k: int
    #: each attack of the ensemble alone
    per_member: dict[str, MemberFigures]
    seconds: float


class Adaptive(TypedDict, total=False):
    """``adaptive``: the attacker who knows the detectors (:func:`guard.adaptive_eval.evaluate_adaptive`)."""

    eps: float
    evasion: float | None
    #: why ``evasion`` is None, in reports of earlier guard versions (the page still shows it; the
    #: current audit attacks every held-out image and does not write it)
    note: str
    misclassified: float | None
    n: int
    n_correct: int
    steps: int
    restarts: int
    weights: list[float]
    members: list[str]
    eot: int | None
    random_parts: list[str]
    fpr: float
    per_eps: list[AdaptiveAtEps]
    rule: str


class RobustCounts(TypedDict, total=False):
    clean_correct: int
    clean_rejected: int
    robust: int
    robust_with_rejection: int


class RobustIntervals(TypedDict, total=False):
    level: float
    method: str
    clean_accuracy: list[float]
    clean_rejected: list[float]
    robust_accuracy: list[float]
    robust_accuracy_with_rejection: list[float]


class RobustAttack(TypedDict, total=False):
    """``robust.per_attack[NAME]`` (AutoAttack's and guard's attack names)."""

    attacked: int
    broken: int
    rejected: int
    robust_accuracy: float
    robust_accuracy_with_rejection: float
    seconds: float
    #: the attack's arguments (free-form by design)
    params: dict[str, Any]


class RobustChecks(TypedDict, total=False):
    randomized: bool
    outputs_probabilities: bool
    zero_gradient_share: float
    square_beat_white_box: bool


class LossCurve(TypedDict, total=False):
    images: list[int]
    loss: list[list[float]]
    loss_name: str


class RobustBudget(TypedDict, total=False):
    """The fields of :class:`guard.robust.RobustBudget`."""

    steps: int
    restarts: int
    n_target_classes: int
    fab_steps: int
    n_queries: int
    curves: int


class SweepChecks(TypedDict, total=False):
    monotone: bool
    zero_at_largest: bool
    largest_eps: float


class RobustSweep(TypedDict, total=False):
    eps: list[float]
    clean_accuracy: float
    robust_accuracy: list[float]
    robust_accuracy_with_rejection: list[float]
    checks: SweepChecks
    warnings: list[str]


class Robust(TypedDict, total=False):
    """``robust``: :func:`guard.evaluate_robust` and the sweep."""

    eps: float
    n: int
    clean_accuracy: float
    clean_rejected: float
    robust_accuracy: float
    robust_accuracy_with_rejection: float
    attacks: list[str]
    reject_model: bool
    real_classes: int
    counts: RobustCounts
    intervals: RobustIntervals
    per_attack: dict[str, RobustAttack]
    checks: RobustChecks
    warnings: list[str]
    loss_curves: dict[str, LossCurve]
    budget: RobustBudget
    seed: int
    unavailable: list[str]
    seconds: float
    rule: str
    sweep: RobustSweep


class Certified(TypedDict, total=False):
    """``certified``: PatchCleanser's certificates (:mod:`guard.audit.certified`)."""

    patch_area_requested: float
    patch_area: float
    n: int
    clean_accuracy: float
    certified_recovery: float
    certified_detection: float
    clean_flagged: float
    patch_side: int
    masks: int
    mask_size: list[int]
    model_accuracy: float
    k: int
    seconds: float


# -- harden, export


class HardenRound(TypedDict, total=False):
    """``harden.rounds[i]`` and ``harden.baseline`` (round 0); online methods: one row per epoch."""

    round: int
    clean_accuracy: float | None
    fooling_classes_ge99: float | None
    fooling_classes_ge99_count: int | None
    fooling_median_confidence: float | None
    patch_fooling_rate: float | None
    rejected_share_of_round_attacks: float | None
    clean_rejected_share: float | None
    fresh_rejected_share: float | None
    archive_size: int | None
    seconds_attack: float | None
    seconds_train: float | None
    #: guard.training's measurements on fresh attacks (free-form here: harden owns them)
    fresh: dict[str, Any]
    epoch: int
    train_loss: float | None
    #: the online method's robustness monitor (free-form here: guard.training owns it)
    monitor: dict[str, Any] | None
    train_seconds: float | None


#: ``harden.goals`` (a key with a dot, hence the functional form)
HardenGoals = TypedDict(
    "HardenGoals",
    {"clean_accuracy_drop_le_0.5_points": bool, "fooling_classes_ge99_le_1": bool | None},
    total=False,
)


class Harden(TypedDict, total=False):
    """``harden`` (with ``--harden``): :func:`guard.audit.harden.harden_section`."""

    method: str
    rounds: list[HardenRound]
    baseline: HardenRound
    num_classes: int
    reject_index: int
    attacks: list[str] | None
    #: HardenConfig's budget and settings (free-form here: guard.training owns them)
    budget: dict[str, Any] | None
    settings: dict[str, Any]
    archive_size: int
    clean_accuracy_drop_points: float
    goals: HardenGoals
    timings: dict[str, float]
    seconds: float
    model_sha256: str
    model_path: str


class ExportHeads(TypedDict, total=False):
    exported: list[str]
    left_out: dict[str, str]
    combined: str
    combined_partial: bool


class ParityFigures(TypedDict, total=False):
    max_abs: float
    max_rel: float
    agreement: float
    n_diff: int
    identical: bool
    borderline: int
    passed: bool


class SessionInfo(TypedDict, total=False):
    """The fields of :class:`guard.export.session.SessionReport`."""

    requested: str
    available: list[str]
    providers: list[str]
    node_providers: dict[str, int]
    cpu_compute_nodes: list[str]
    fell_back: bool
    notes: list[str]


class LatencyFigures(TypedDict, total=False):
    onnxruntime_cpu_ms: float
    pytorch_eager_ms: float
    ratio: float | None


class Export(TypedDict, total=False):
    """``export``: the ONNX graph, its parity with PyTorch and its latency."""

    path: str
    source: str
    opset: int
    outputs: list[str]
    heads: ExportHeads
    file_bytes: int
    external_data: bool
    sha256: str
    signed: bool
    #: graph output -> figures
    parity: dict[str, ParityFigures]
    parity_batch_sizes: list[int]
    providers: list[str]
    session: SessionInfo
    cuda: str
    export_seconds: float
    versions: dict[str, str]
    #: "clean" or attack -> graph output -> figures
    parity_full: dict[str, dict[str, ParityFigures]]
    flags_identical: bool
    flags_identical_except_borderline: bool
    #: "batch_<B>" -> figures, and "threads": int
    latency_ms: dict[str, LatencyFigures | int]
    seconds: float


# -- the top level


class Report(TypedDict, total=False):
    """report.json: one section per audit step, and the run's bookkeeping."""

    version: int
    options: Options
    defaults: Defaults
    settings: Settings
    _completed_steps: list[str]
    model: ModelSection
    #: step -> seconds
    timings: dict[str, float]
    attacks: dict[str, AttackEntry]
    #: detector -> attack -> metrics
    detectors: dict[str, dict[str, DetectionMetrics]]
    detectors_info: DetectorsInfo
    adaptive: Adaptive
    robust: Robust
    certified: Certified
    harden: Harden
    export: Export
    #: step (or "report": the page) -> the error, in words
    errors: dict[str, str]
    #: step -> why an option left it out
    skipped: dict[str, str]


def unknown_keys(report: Mapping[str, Any]) -> list[str]:
    """The dotted paths of the keys of ``report`` that :class:`Report` does not declare.

    Walks the report along the types: into nested TypedDicts, into ``dict[str, T]`` maps (an
    attack's or detector's name is one step of the path) and into lists (``per_eps[0]``). Values
    typed ``Any`` (free-form by design) are not looked into; values of the wrong JSON kind are
    not reported (this checks the vocabulary, not the figures).
    """
    out: list[str] = []
    _walk(report, Report, "", out)
    return out


def _walk(value: Any, tp: Any, path: str, out: list[str]) -> None:
    if is_typeddict(tp):
        if not isinstance(value, Mapping):
            return
        hints = get_type_hints(tp)
        for key, sub in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in hints:
                _walk(sub, hints[key], where, out)
            else:
                out.append(where)
        return
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):  # the member of the value's JSON kind
        for member in args:
            if _accepts(member, value):
                _walk(value, member, path, out)
                return
    elif origin is dict and isinstance(value, Mapping):
        for key, sub in value.items():
            _walk(sub, args[1], f"{path}.{key}", out)
    elif origin is list and isinstance(value, list):
        for i, sub in enumerate(value):
            _walk(sub, args[0], f"{path}[{i}]", out)


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a union member ``tp`` is of ``value``'s JSON kind (an object or an array)."""
    if isinstance(value, Mapping):
        return is_typeddict(tp) or get_origin(tp) is dict
    return isinstance(value, list) and get_origin(tp) is list
