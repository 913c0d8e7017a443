"""Calling lora-workers from a service (docs/client.md): submit jobs, await their answers.

from workers.client import Client, JobFailed, as_completed

with Client("lora-workers.yaml") as client:
    handle = client.submit({"job_id": "j-1", "task": "classify", "input": "..."})
    try:
        result = handle.result(timeout=30)
    except JobFailed as failed:
        print(failed.code, failed.message)
"""

from workers.client.book import DEFAULT_MAX_KEPT, JobFailed, JobHandle, as_completed
from workers.client.client import DEFAULT_LOOKBACK_S, PUBLISH_FAILED, Client, UnknownTask

__all__ = [
    "DEFAULT_LOOKBACK_S",
    "DEFAULT_MAX_KEPT",
    "PUBLISH_FAILED",
    "Client",
    "JobFailed",
    "JobHandle",
    "UnknownTask",
    "as_completed",
]
