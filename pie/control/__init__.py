"""The control layer: KV page pool, named exports, KV contexts and the batch scheduler.

It talks to "an engine" through EnginePort and never imports torch.
"""

from pie.control.context import ContextManager, CopySink, KvContext
from pie.control.engine_port import EnginePort
from pie.control.errors import (
    ContextClosedError,
    ControlError,
    ExportExistsError,
    ExportNotFoundError,
    ForwardCancelledError,
    IntegrityError,
    InvalidRequestError,
    NotOwnerError,
    PoolExhaustedError,
    QuotaExceededError,
    SchedulerStoppedError,
    UnknownPageError,
)
from pie.control.exports import REGISTRY_OWNER, Export, ExportRegistry
from pie.control.forward import ForwardRequest
from pie.control.page_pool import OwnerId, PagePool
from pie.control.scheduler import BatchScheduler, SchedulerStats, StepInfo

__all__ = [
    "REGISTRY_OWNER",
    "BatchScheduler",
    "ContextClosedError",
    "ContextManager",
    "ControlError",
    "CopySink",
    "EnginePort",
    "Export",
    "ExportExistsError",
    "ExportNotFoundError",
    "ExportRegistry",
    "ForwardCancelledError",
    "ForwardRequest",
    "IntegrityError",
    "InvalidRequestError",
    "KvContext",
    "NotOwnerError",
    "OwnerId",
    "PagePool",
    "PoolExhaustedError",
    "QuotaExceededError",
    "SchedulerStats",
    "SchedulerStoppedError",
    "StepInfo",
    "UnknownPageError",
]
