"""The schedule search: budgets, cheap latency prediction, progress display and the Optuna study.

Needs the ``search`` extras (optuna, rich); the runtime (``rapid_search`` top level) does not.
"""
