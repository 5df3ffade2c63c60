"""Method-agnostic core: configs, targeting, the adapted model, and adapter files."""
