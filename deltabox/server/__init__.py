"""The gRPC daemon: application, servicers, conversion."""
