"""Shared tooling of the d2ext packages: built-in datasets, trainer and evaluator glue, launch on CPU,
visualisation and benchmark helpers. Importing it registers the built-in datasets with Detectron2."""
from .data import builtin as _builtin

_builtin.register_all()
