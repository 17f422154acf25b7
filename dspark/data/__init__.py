"""Corpora shared by training and evaluation: `corpus` (text found on this machine, its domains,
stable train / held-out splits, the manifest), `tokenizer` (BPE training, the special tokens,
tokenizing a split) and `pack` (fixed-length sequences). Imports nothing above `dspark.decode`
(only `dspark.text`, lazily, to load a trained tokenizer)."""
