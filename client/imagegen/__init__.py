"""Generated protobuf and gRPC modules for the imagegen API (see protos/; made by `make proto`)."""
