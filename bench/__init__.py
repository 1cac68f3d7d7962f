"""`make bench`: the engine's throughput limit against three servers under the same loads.

`python -m bench.run` measures, in one run on one machine with the `bench` preset model: the
engine alone (no server) at batch sizes 1..8, a naive one-request-at-a-time diffusers server, and
the real server with request-level and step-level batching, under closed-loop and open-loop
(Poisson) loads, for one resolution and for a mix of resolutions and step counts. Results go to
JSON and a PNG plot in docs/benchmarks/, summarised in docs/benchmarks.md.
"""
