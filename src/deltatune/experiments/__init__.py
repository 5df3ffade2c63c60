"""Experiments and analysis: sweeps with baselines, intrinsic dimension, and what a LoRA
update does to the weights.

- :mod:`~deltatune.experiments.grid`: sweep files, validated and expanded into runs;
- :mod:`~deltatune.experiments.sweep`: running them in worker processes, resumably;
- :mod:`~deltatune.experiments.results`: ``results.csv`` and the mean ± std table;
- :mod:`~deltatune.experiments.report`: writes both and the plots into the sweep folder;
- :mod:`~deltatune.experiments.plots`: the plots (matplotlib, Agg);
- :mod:`~deltatune.experiments.fastfood` and :mod:`~deltatune.experiments.intrinsic`: training
  in a random subspace and the intrinsic dimension d90;
- :mod:`~deltatune.experiments.subspace`: subspace similarity and amplification of LoRA updates;
- :mod:`~deltatune.experiments.params`: the parameter and memory table of a recipe.

The command line (``deltatune sweep``, ``deltatune analyze ...``) is a thin layer over these.
"""

from deltatune.experiments import intrinsic  # noqa: F401  (registers the recipe method "intrinsic" with train)
