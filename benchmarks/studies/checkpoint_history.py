"""Write the per-epoch history a ``guard.harden`` checkpoint holds (for a run that was stopped, not finished) to a results file.

An online hardening run that is abandoned (a setting found wanting) leaves its checkpoint; its
history (per epoch: clean accuracy, clean rejection, the 10-step PGD monitor) is the measurement of
why it was abandoned. This copies it, with the run's settings, through ``write_results``:

    .venv/bin/python -m benchmarks.studies.checkpoint_history CHECKPOINT_DIR --out benchmarks/results/NAME.json --note "..."
"""

from __future__ import annotations

import argparse

from guard.core.provenance import write_results
from guard.training.checkpoint import load_checkpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--note", default="")
    args = p.parse_args()
    found = load_checkpoint(args.checkpoint_dir)
    if found is None:
        raise SystemExit(f"no checkpoint in {args.checkpoint_dir!r}")
    meta = found[3]
    write_results(
        args.out,
        {
            "settings": meta["config"],
            "epochs_done": meta["epoch"],
            "batches_into_next_epoch": meta["batch"],
            "baseline": meta["baseline"],
            "history": meta["history"],
            "note": args.note,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
