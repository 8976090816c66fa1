"""dfcompress: data-free compression of image classifiers.

Pipeline (one subpackage per stage): models (load) -> stats -> inversion (synthesize) -> compress
(distill | prune | quantize) -> export -> evaluate/report. The CLI in ``cli.py`` only parses and calls
these functions, so a notebook and a CI job run the same code.
"""
__version__ = "0.1.0"
