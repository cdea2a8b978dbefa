"""Redis adapters of the approval protocol (contract section 4): approval requests, approval
signals over Pub/Sub and a health probe, over a real server or an in-process fakeredis."""

from adapters.redis.approvals import RedisApprovalStore
from adapters.redis.client import create_redis
from adapters.redis.health import RedisHealthProbe
from adapters.redis.signals import RedisSignalBus, SignalBusClosed

__all__ = ["RedisApprovalStore", "RedisHealthProbe", "RedisSignalBus", "SignalBusClosed", "create_redis"]
