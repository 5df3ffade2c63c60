"""Fixtures of the experiment tests: the training tests' toy models, synthetic sentiment data
and recipe builder (tiny random BERT, runs in seconds), re-exported here."""

from __future__ import annotations

from train.conftest import (SHARED_DATA, read_json, recipe, sentiment_files, sentiment_rows, toy_models,  # noqa: F401
                            write_tsv)
