"""Resident memory of this process, for the benchmarks (Linux: /proc and ru_maxrss in KiB)."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator

__all__ = ["rss_mb", "peak_rss_mb", "size_runs"]


def rss_mb() -> float:
    """Current resident set size in MB (NaN where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def size_runs(
    script: str, one: Callable[..., dict], *, sizes: str, tensor: int, options: dict[str, int] | None = None
) -> tuple[argparse.Namespace, Iterator[dict]]:
    """The command line of a stream-versus-tensor benchmark: ``--sizes``, ``--px``, ``--batch``, ``--tensor N``.

    ``options``: more integer options {name: default} (``--name``), passed on to the child and to
    ``one`` as keyword arguments.

    In the child (``--one N``) it prints ``one(N, px, batch, as_tensor)`` as JSON and exits;
    otherwise it runs ``script`` once per size (and once for ``--tensor N`` through the
    tensor path), each in its own process so that each peak RSS is that run's alone, and gives
    their results as they finish.
    """
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=sizes)
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument(
        "--tensor",
        type=int,
        default=tensor,
        help="also run this N through the tensor path (images materialised); 0: none",
    )
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--as-tensor", action="store_true", help=argparse.SUPPRESS)
    options = dict(options or {})
    for name, default in options.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = ap.parse_args()
    kw = {name: getattr(args, name) for name in options}
    if args.one:
        print(json.dumps(one(args.one, args.px, args.batch, args.as_tensor, **kw)))
        sys.exit(0)
    runs = [(int(s), False) for s in args.sizes.split(",")] + ([(args.tensor, True)] if args.tensor else [])

    def results() -> Iterator[dict]:
        for n, as_tensor in runs:
            cmd = [sys.executable, script, "--one", str(n), "--px", str(args.px), "--batch", str(args.batch)] + (
                ["--as-tensor"] if as_tensor else []
            )
            cmd += [a for name, v in kw.items() for a in (f"--{name.replace('_', '-')}", str(v))]
            yield json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            )

    return args, results()
