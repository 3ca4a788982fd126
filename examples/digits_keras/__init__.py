"""The digits demo with Keras 3 (torch backend): a small CNN on the bundled 8x8 digits.

``app.py`` is the Python app (``fedray edge start --app examples.digits_keras.app``),
``client/`` the same client as a compute package, ``seed.py`` the initial global model.
The data files are the digits example's (``examples/digits/data.py``).
"""
