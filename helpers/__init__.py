"""RL-MedBook helpers: the one thin package every notebook imports.

Modules: ``config`` (params and paths), ``repro`` (seeding and provenance), ``data``
(MedMNIST by flag), ``augment`` (batched per-sample augmentation), ``models`` (registry),
``train`` (the one ``fit``), ``metrics``, ``rl`` (REINFORCE pieces), ``results`` (the run
recorder), ``plots`` and ``run`` (the papermill runner).
"""

__version__ = "0.1.0"
