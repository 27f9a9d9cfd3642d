"""tensorfleet node: the worker-machine daemon.

Device inventory, capacity probe, joining and heartbeats, one executor process per device, loading a
stage, serving the data plane and forwarding activations to the next stage. It never decides
placement (the coordinator does).
"""
