"""Generated protobuf and gRPC stubs for the llmmesh.v1 API. Do not edit."""
