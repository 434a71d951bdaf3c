"""Numbers, labels and commands in words: the formatting every section shares.

Class names: the embedded CIFAR-10 demo has names (report["model"]["data"]["source"] mentions
CIFAR-10); for anything else the page shows class indices, since a user's data brings none.
"""

from __future__ import annotations

import math
import numbers
import shlex
from typing import Any

import numpy as np

__all__ = [
    "CIFAR10_CLASSES",
    "finite",
    "pct",
    "num",
    "seconds",
    "confidence",
    "class_names",
    "label",
    "audit_command",
    "attack_title",
    "attack_short",
    "method_title",
    "rate_ci",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: how the page names each attack of report["attacks"]
ATTACK_TITLES = {
    "fgsm": "FGSM",
    "pgd": "PGD-40",
    "pgd_minimal": "PGD early-stopped",
    "pgd_confident": "PGD-40 confidence-maximising",
    "apgd_ce": "APGD-CE",
    "apgd_t": "APGD-T",
    "square": "Square",
    "cw": "CW-L2",
    "deepfool": "DeepFool",
    "patch_gan": "PatchGAN patches",
    "universal_patch": "universal patch",
    "random_patch": "random noise patch",
    "feature_adversary": "feature adversaries",
    "fooling_gradient": "fooling images (gradient ascent)",
    "fooling_direct": "fooling images (direct encoding)",
    "fooling_cppn": "fooling images (CPPN encoding)",
}


#: shorter names for plot titles and table columns
ATTACK_SHORT = {
    "fgsm": "FGSM",
    "pgd": "PGD",
    "pgd_minimal": "PGD min.",
    "pgd_confident": "PGD conf.",
    "apgd_ce": "APGD-CE",
    "apgd_t": "APGD-T",
    "square": "Square",
    "cw": "CW-L2",
    "deepfool": "DeepFool",
    "patch_gan": "PatchGAN",
    "universal_patch": "universal patch",
    "random_patch": "random patch",
    "feature_adversary": "feature adv.",
    "fooling_gradient": "fooling (gradient)",
    "fooling_direct": "fooling (direct)",
    "fooling_cppn": "fooling (CPPN)",
}


def attack_title(name: str) -> str:
    return ATTACK_TITLES.get(name, name)


def attack_short(name: str) -> str:
    return ATTACK_SHORT.get(name, name)


def method_title(name: str) -> str:
    """A fooling method without the words 'fooling images': 'gradient ascent', 'CPPN encoding'."""
    t = attack_title(name)
    return t[len("fooling images (") : -1] if t.startswith("fooling images (") and t.endswith(")") else t


def rate_ci(r: Any, digits: int = 1) -> str:
    """An operating-point rate {"rate", "k", "n", "ci95"} as "93.2% [89.4–95.9%] of 250"; "n/a" otherwise."""
    if not isinstance(r, dict) or finite(r.get("rate")) is None:
        return "n/a"
    ci = r.get("ci95") if isinstance(r.get("ci95"), (list, tuple)) and len(r["ci95"]) == 2 else None
    band = f" [{pct(ci[0], digits)[:-1]}–{pct(ci[1], digits)}]" if ci else ""
    return f"{pct(r['rate'], digits)}{band} of {num(r.get('n'))}"


def finite(v: Any) -> float | None:
    """``v`` as a float when it is a finite real number (Python or numpy; bools excluded), else None."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def pct(v: Any, digits: int = 1) -> str:
    """0.859 -> '85.9%'; 'n/a' for anything that is not a finite number."""
    f = finite(v)
    return "n/a" if f is None else f"{100.0 * f:.{digits}f}%"


def num(v: Any, digits: int = 3) -> str:
    """A number in ``digits`` significant digits (integers as they are); 'n/a' otherwise."""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    f = finite(v)
    if f is None:
        return "n/a" if v is None or not isinstance(v, float) else str(v)
    return f"{f:.{digits}g}"


def seconds(v: Any) -> str:
    """A duration: '4.75 s', '23.6 s', '968 s', '1,820 s'."""
    f = finite(v)
    if f is None:
        return "n/a"
    return f"{f:.2f} s" if f < 10 else f"{f:.1f} s" if f < 100 else f"{f:,.0f} s"


def confidence(v: Any) -> str:
    """A softmax confidence: three decimals of a percent near certainty (99.997%), else one.

    Cut, not rounded, so 0.99999994 reads 99.999% (at least that), never a certainty it is not."""
    f = finite(v)
    if f is None:
        return "n/a"
    if f >= 0.999:
        return f"{math.floor(f * 1e5 + 1e-9) / 1e3:.3f}%"
    return f"{math.floor(f * 1e3 + 1e-9) / 10:.1f}%"


def class_names(report: dict[str, Any]) -> tuple[str, ...] | None:
    """Names of the classes when the data is known (the embedded CIFAR-10), else None."""
    source = str(((report.get("model") or {}).get("data") or {}).get("source", ""))
    return CIFAR10_CLASSES if "cifar-10" in source.lower() or "cifar10" in source.lower() else None


def label(i: Any, names: tuple[str, ...] | None) -> str:
    """Class ``i`` as the page writes it: its name when known, else its index."""
    try:
        k = int(i)
    except (TypeError, ValueError):
        return str(i)
    if names is not None and 0 <= k < len(names):
        return names[k]
    return "reject" if k < 0 else str(k)


def audit_command(report: dict[str, Any]) -> str:
    """The ``guard audit`` command that writes a report like this one (OUT = this page's folder)."""
    model = report.get("model") or {}
    name = str(model.get("name", ""))
    opts = report.get("options") or {}
    parts = ["guard", "audit"]
    if name.startswith("guard.demo_model("):
        demo = name[len("guard.demo_model(") :].rstrip(")").strip("'\"") or "mnist"
        parts += ["--demo", demo]
    else:
        parts += ["--model", name or "SPEC", "--data", "DATA"]
    if opts.get("quick"):
        parts.append("--quick")
    if opts.get("harden") or "harden" in report:
        parts.append("--harden")
    if opts.get("export") is False:
        parts.append("--no-export")
    if isinstance(opts.get("seed"), int) and opts["seed"] != 0:
        parts += ["--seed", str(opts["seed"])]
    return " ".join(shlex.quote(p) for p in parts) + " --out OUT"
