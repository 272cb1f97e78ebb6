"""The training core: one resolved config in, one trained model and its metrics out.

Imports only ``service.search_space`` from the rest of the package: no HTTP, no database,
and Optuna only inside ``objective.py``.
"""
