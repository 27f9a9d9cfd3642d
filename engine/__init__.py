"""tensorfleet engine: the math. No grpc, no knowledge of nodes or the network."""
