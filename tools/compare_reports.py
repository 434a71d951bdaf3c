"""Compare two audit output folders figure by figure: ``python tools/compare_reports.py BEFORE AFTER``.

Shows that a restructuring changed no result (issue 35): every leaf of BEFORE/report.json
(numbers, strings, booleans, nulls) must be equal in AFTER/report.json, and every tensor of every
``.safetensors`` file under BEFORE/artifacts and BEFORE/guarded (the attack results, the universal
patch, the PatchGAN generator, the detector scores, the fitted detectors) must be bit-identical
(same dtype, shape and bytes) in AFTER. Left out of the comparison, and only these (:data:`IGNORED_KEYS`,
:func:`ignored`): wall-clock timings (``timings``, ``seconds``, ``*_seconds``, ``latency_ms``), file
paths, whether the demo model came from the cache, and the two SHA-256 digests of files whose
bytes the artifacts comparison already covers or that hold paths; sections only AFTER has (a
restructuring may add keys) are listed, not counted as differences. Exit 1 on any difference.

``--results FILE`` writes the outcome through :func:`guard.core.provenance.write_results`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import safe_open

#: Keys whose values are not results: wall-clock time, where files were written, cache state.
IGNORED_KEYS = frozenset(
    {
        "timings",
        "seconds",
        "latency_ms",
        "path",
        "cache_path",
        "model_path",
        "checkpoint_dir",
        "cache_hit",
        "_completed_steps",
    }
)
#: Paths (dotted) left out: the GuardedModel folder's digest covers guarded.json, which the
#: tensor comparison covers file by file; model.onnx's digest is compared as a file below.
IGNORED_PATHS = frozenset({"detectors_info.sha256", "export.sha256"})


def ignored(path: tuple[str, ...]) -> bool:
    """Whether the leaf at ``path`` (keys from the report's root) is left out of the comparison."""
    last = path[-1] if path else ""
    if ".".join(path) in IGNORED_PATHS:
        return True
    if any(k in IGNORED_KEYS for k in path):
        return True
    return last.endswith("_seconds") and last != "max_seconds"  # max_seconds is a setting (a cap), not a timing


def leaves(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) leaf of a JSON object; list items are keyed by their index."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (str(k),))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, path + (f"[{i}]",))
    else:
        yield path, obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def compare_reports(before: dict, after: dict) -> tuple[list[str], list[str], int]:
    """(differences, keys only in ``after``, leaves compared)."""
    a = {p: v for p, v in leaves(before) if not ignored(p)}
    b = {p: v for p, v in leaves(after) if not ignored(p)}
    diffs = []
    for p, v in a.items():
        if p not in b:
            diffs.append(f"report.json {'.'.join(p)}: {v!r} before, missing after")
        elif not _same(v, b[p]):
            diffs.append(f"report.json {'.'.join(p)}: {v!r} before, {b[p]!r} after")
    added = sorted({p[0] for p in b if p not in a})
    return diffs, added, len(a)


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k).contiguous()
            out[k] = (str(t.dtype), tuple(t.shape), t.numpy().tobytes())
    return out


def compare_tensors(before: Path, after: Path) -> tuple[list[str], int]:
    """Bit-level differences between the ``.safetensors`` files under artifacts/ and guarded/ (and model.onnx's bytes)."""
    diffs, n = [], 0
    files = sorted(
        p.relative_to(before) for sub in ("artifacts", "guarded") for p in (before / sub).glob("*.safetensors")
    )
    for rel in files:
        other = after / rel
        if not other.is_file():
            diffs.append(f"{rel}: missing after")
            continue
        ta, tb = _tensors(before / rel), _tensors(other)
        for k in sorted(set(ta) | set(tb)):
            n += 1
            if k not in ta or k not in tb:
                diffs.append(f"{rel}[{k}]: only {'before' if k in ta else 'after'}")
            elif ta[k][:2] != tb[k][:2]:
                diffs.append(f"{rel}[{k}]: dtype/shape {ta[k][:2]} before, {tb[k][:2]} after")
            elif ta[k][2] != tb[k][2]:
                diffs.append(f"{rel}[{k}]: values differ")
    if (before / "model.onnx").is_file():
        n += 1
        if (
            not (after / "model.onnx").is_file()
            or (before / "model.onnx").read_bytes() != (after / "model.onnx").read_bytes()
        ):
            diffs.append("model.onnx: bytes differ")
    return diffs, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument(
        "--results", type=Path, default=None, help="write the outcome here (guard.core.provenance.write_results)"
    )
    args = ap.parse_args(argv)
    ra = json.loads((args.before / "report.json").read_text())
    rb = json.loads((args.after / "report.json").read_text())
    rdiff, added, n_leaves = compare_reports(ra, rb)
    tdiff, n_tensors = compare_tensors(args.before, args.after)
    for d in rdiff + tdiff:
        print(d)
    print(
        f"{n_leaves} report.json figures compared, {len(rdiff)} differ; {n_tensors} saved tensors compared, {len(tdiff)} differ"
        + (f"; sections only after: {', '.join(added)}" if added else "")
    )
    if args.results is not None:
        from guard.core.provenance import write_results

        write_results(
            args.results,
            {
                "before": str(args.before),
                "after": str(args.after),
                "equal": not rdiff and not tdiff,
                "report_figures_compared": n_leaves,
                "report_figures_differing": len(rdiff),
                "tensors_compared": n_tensors,
                "tensors_differing": len(tdiff),
                "differences": rdiff + tdiff,
                "sections_only_after": added,
                "ignored_keys": sorted(IGNORED_KEYS),
                "ignored_paths": sorted(IGNORED_PATHS),
            },
        )
    return 1 if rdiff or tdiff else 0


if __name__ == "__main__":
    sys.exit(main())
