"""The digits demo with PyTorch: a small CNN on scikit-learn's bundled 8x8 digits.

``app.py`` is the Python app (``fedray edge start --app examples.digits_torch.app``),
``client/`` the same client as a compute package, ``seed.py`` the initial global model.
The data files are the digits example's (``examples/digits/data.py``).
"""
