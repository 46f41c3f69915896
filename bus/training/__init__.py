"""The trainer behind ``python -m bus.train``, split by duty (as ``open_clip_train``):

- :mod:`.config`: :class:`TrainConfig`, the flags, YAML and ``--preset`` resolution;
- :mod:`.distributed`: ranks, barriers, gathers (torchrun);
- :mod:`.data`: the run's data sets, tokenizer and per-epoch loaders (exact resume);
- :mod:`.loop`: optimizer and schedule, one step, one epoch, the metrics log;
- :mod:`.checkpoint`: safe (``weights_only=True``), validated, durable checkpoints and RNG state;
- :mod:`.evaluate`: retrieval recall and the relevance picture.

:func:`bus.train.train` wires them together.
"""
