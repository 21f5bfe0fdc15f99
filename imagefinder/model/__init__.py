"""Models: which exist (``registry``, no torch), how they load (``cnn``, ``weights``), and
the loaded ``Embedder`` that turns images into unit vectors (``embedder``)."""
