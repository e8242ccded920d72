"""Tools that need PyTorch: reading the pretrained weights and the eager reference of the scorer.

Nothing under edge_inspect/ outside this package imports torch; install the `export` extra to use it.
"""
