"""The shared foundation: data, input validation, named features, models, the cache.

Everything else in guard builds on these modules; they import nothing from
``guard.attacks``, ``guard.detectors``, ``guard.training``, ``guard.export`` or the facade
(enforced by the import-linter contract in ``pyproject.toml``).
"""
