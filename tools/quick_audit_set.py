"""``guard audit --demo --quick --threads 1 --out OUT -q`` with ``options.extra`` keys: ``python tools/quick_audit_set.py OUT KEY=JSON ...``.

The command line has no flag for the steps' keys; this runs the same audit as the command
(the embedded MNIST demo, its model, seed 0, quick mode, export on, one torch thread) through
:func:`guard.audit.run_audit` with the given keys, e.g. ``patch_gan_seconds=null
universal_seconds=null``: the quick audit's two wall-clock caps off, so that its figures do not
depend on how busy the machine is (issue 35's before/after comparison, tools/compare_reports.py).
Only names that exist since before issue 35 are used, so the same script runs on both sides.
"""

from __future__ import annotations

import json
import sys

import torch


def main(argv: list[str]) -> int:
    import guard
    from guard.audit import AuditOptions, run_audit
    from guard.demo import demo_source

    out, pairs = argv[0], argv[1:]
    extra = {}
    for p in pairs:
        key, _, value = p.partition("=")
        extra[key] = json.loads(value)
    torch.set_num_threads(1)
    train, test = guard.demo_data("mnist")
    opts = AuditOptions(
        seed=0, quick=True, harden=False, export=True, repetitions=10, progress=False, device="cpu", extra=extra
    )
    report = run_audit(
        guard.demo_model("mnist", progress=False),
        train,
        test,
        out,
        model_name="guard.demo_model('mnist')",
        data_source=demo_source("mnist"),
        options=opts,
    )
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
