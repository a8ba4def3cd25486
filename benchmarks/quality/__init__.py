"""The quality benchmark: does each technique train a better model than adam and adamw?

Not run by ``make test`` (its smoke version is, in ``tests/test_quality.py``); run it with
``python -m benchmarks --quality``. See :mod:`benchmarks.quality.run`.
"""
