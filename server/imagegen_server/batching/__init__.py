"""The batching policy (pure Python: the scheduler and row selection) and its one thread bridge
to the engine (the batcher). Imports neither torch nor grpc, and nothing from the engine.
"""
