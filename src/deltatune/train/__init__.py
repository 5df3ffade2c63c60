"""Training: recipes in, fine-tuned adapters, metrics and plots out.

    from deltatune.train import train
    summary = train("recipe.yaml", ["train.lr=1e-3"])

See :mod:`deltatune.train.recipe` for the recipe keys and :mod:`deltatune.train.loop` for the loop.
"""

from deltatune.train.optim import lora_plus_groups
from deltatune.train.recipe import Recipe, builtin_names, load as load_recipe
from deltatune.train.run import train

__all__ = ["train", "Recipe", "load_recipe", "builtin_names", "lora_plus_groups"]
