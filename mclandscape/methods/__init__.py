"""The methods layer: the loss-landscape methods built on the engine."""
