"""Equal-budget comparison of pruning methods (``scripts/compare.py -opt options/compare/<preset>.yml``).

* :mod:`.methods`: the table of methods (model type, how a budget becomes its ``pruning`` keys);
* :mod:`.budgets`: counts without training (prune-ratio search, uniform-width networks);
* :mod:`.preset`: reading and checking a preset, the cells and their option files;
* :mod:`.runner`: running the cells as ordinary fmpsr runs (train, test), resumable;
* :mod:`.recount`: params / MACs recounted from the exported files;
* :mod:`.report`: ``results.jsonl``, ``report.md`` and the plots.
"""
