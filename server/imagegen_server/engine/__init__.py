"""The engine: the only owner of torch and the model. Imports nothing from the API or batching
layers; the batcher drives it through the interface in `base.engine_api`.
"""
