"""The shared base: settings, typed errors, metrics and the request types every layer reads.

Imports no torch, no grpc and nothing from the other layers.
"""
