"""A small audit for the kill-and-resume test: ``python tests/audit_driver.py OUT [--resume]``.

The demo model on 600 / 200 images of the embedded default, quick mode, no export, every step
shrunk through ``options.extra`` so that one run takes well under a minute. The test starts
:func:`run` in processes forked from a forkserver that imported guard once (a fresh
interpreter per run would spend ~3.5 s importing torch before the audit starts).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

import guard
from guard.audit import AuditOptions, run_audit

EXTRA = {
    "adaptive_n": 8,
    "adaptive_steps": 3,
    "feature_n": 8,
    "feature_max_iter": 3,
    "feature_curve_n": 8,
    "feature_curve_max_iter": 3,
    "fooling_grad_steps": 5,
    "fooling_generations": 2,
    "fooling_population": 10,
    "fooling_transfer": False,
    "patch_areas": [0.05],
    "patch_train_images": 128,
    "patch_gan_steps": 4,
    "universal_steps": 4,
}


def run(out: str, resume: bool, log_path: str) -> None:
    """One audit with the runner's log (INFO) in ``log_path``; the process exits with :func:`main`'s code."""
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    sys.exit(main([out] + (["--resume"] if resume else []), configure_logging=False))


def main(argv: list[str], configure_logging: bool = True) -> int:
    torch.set_num_threads(1)
    if configure_logging:
        logging.basicConfig(
            level=os.environ.get("GUARD_AUDIT_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
        )
    out, resume = argv[0], "--resume" in argv[1:]
    train, test = guard.demo_data()
    train, test = guard.Split(train.x[:600], train.y[:600]), guard.Split(test.x[:200], test.y[:200])
    opts = AuditOptions(quick=True, export=False, progress=False, extra=dict(EXTRA))
    report = run_audit(
        guard.demo_model(progress=False), train, test, out, model_name="demo", options=opts, resume=resume
    )
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
