"""tensorfleet coordinator: the head of a cluster.

Membership and failure detection, the placement planner, the scheduler, failover, and the
client-facing APIs. It never runs model layers (nodes do).
"""
