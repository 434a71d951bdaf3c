"""guard's benchmarks, by kind. Run each from the repository root as a module:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.pgd_vs_torchattacks

* :mod:`benchmarks.peers` — guard beside a peer library (torchattacks, IBM ART, scikit-learn,
  PyTorch eager, a plain training loop) in one process: ratios of the same run;
* :mod:`benchmarks.scale` — memory and time as the data or the bank grows;
* :mod:`benchmarks.studies` — measurements that settle a default or a claim (tuning on data that is
  not reported, detection by attack strength, robust accuracy, certified patches ...);
* :mod:`benchmarks.imagenet` — the 224-px pipelines on EfficientNet-Lite0 and the ImageNet sample;
* :mod:`benchmarks.fixtures` — what tests and benchmarks share (a user's CIFAR ResNet-20 module,
  process memory).

Every script writes its figures to ``benchmarks/results/`` as JSON with the commit, machine and
command (:func:`guard.core.provenance.write_results`); BENCHMARKS.md is generated from those
files. ``benchmarks/MOVED.json`` maps the flat paths of earlier commits (which older results
files record as their command) to these modules.
"""
