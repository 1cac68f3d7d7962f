"""The API edge: the only code that imports grpc or the generated `imagegen.v1` modules.

Servicers, interceptors, authentication, transport, validation and the image codec; `server`
assembles the process from the layers below.
"""
