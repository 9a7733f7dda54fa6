"""The engine layer: models, data, the training step and loop, the evaluator, checkpoints and devices.

``models`` (the model contract and zoo), ``data`` and ``tfds_local`` (datasets), ``loop`` (the one step and
loop), ``train`` and ``connector_train`` (endpoint and connector training on the loop), ``evaluate`` (the one
evaluator), ``checkpoint``, ``distributed`` (several devices and processes) and ``cpu`` (the CPU choices).
"""
