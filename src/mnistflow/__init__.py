"""mnistflow: the logic behind the Snakemake MNIST workflow.

Each module that a rule calls is an entry point (`python -m mnistflow.<module>`);
everything else is plain, importable, unit-tested Python.
"""

__version__ = "0.1.0"
