"""The engine layer: models, data, the evaluator, the training loop and checkpoints."""
