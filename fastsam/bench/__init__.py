"""fastsam.bench: the step benchmark (``python -m fastsam.bench``) and the reference
implementations it compares fastsam with. See __main__.py."""
