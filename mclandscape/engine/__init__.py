"""The engine layer: models, data, the training step and loop, the evaluator, checkpoints and devices.

``models`` (the model contract and zoo), ``data``, ``batches`` and ``tfds_local`` (datasets and their
batches), ``step``, ``loop`` and ``resume`` (the one step, the one loop and its resume contract), ``train``
and ``connector_train`` (endpoint and connector training on the loop), ``points``, ``evaluate`` and
``batchnorm`` (families of points, the one evaluator, BatchNorm recalibration), ``mapping`` (the one way to
map over points and the one strategy resolver), ``checkpoint``, ``distributed`` (several devices and
processes), ``optim`` (Optax transforms by value) and ``cpu`` (the CPU choices).
"""
