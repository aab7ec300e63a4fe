"""The experiments behind the committed reports, as functions the scripts call.

``suites`` (the data sets and their run configs), ``runs`` (train, evaluate and measure one run, cached
beside it), ``consolidation`` (the consolidation measurement and its summary), ``consolidation_md`` (its
markdown and chart) and ``stats`` (mean ± std, paired tests, rank correlation). ``scripts/`` parses the
command lines and calls them.
"""
