"""The batching policy and its one thread bridge to the engine. Imports neither torch nor grpc,
and nothing from the engine.

Pure policy: `scheduler` (its contract: add, cancel, plan, update; the types in `plan`), with
its state in `queues`, `row_limits`, `row_selection` and `estimates`. The bridge: `batcher` (the
engine thread's plan, run, update, emit), `requests` (callers' handles and events), `commands`
(functions run on the engine thread) and `recorder` (metrics).
"""
