"""Evaluation of trained models: per-token loss (scoring.py), perplexity and bits per byte on a corpus and loss by
position (perplexity.py), the documents of a corpus (corpus.py), and the lm-evaluation-harness adapter
(harness.py). evaluate.py is the command line."""
