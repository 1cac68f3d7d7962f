"""The engine: the only owner of torch and the model. Imports nothing from the API or batching
layers; the batcher drives it through the interface in `base.engine_api`.

Start-up: `startup` loads the model and builds the `engine.Engine`, then compiles and probes it
(`probes`, `memory`). Serving: `engine` runs add and step; `admission` turns admitted requests
into rows, `batch` holds them, `denoise` steps them, `decode` turns them into pixels.
"""
