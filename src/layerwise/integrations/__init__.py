"""Callbacks for training frameworks, imported lazily: ``layerwise.integrations.lightning`` needs the
``lightning`` extra, ``layerwise.integrations.hf`` the ``hf`` extra (transformers)."""
