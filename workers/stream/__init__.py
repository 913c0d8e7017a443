"""The Kafka worker's units, each a small state machine with fast tests on fakes
(`tests/unit/test_stream_*.py`); `workers/worker.py` runs them in its loop:

- `intake.py`: consume with backpressure, resume a partition from its committed ledger, skip
  what the previous owner answered, prepare in chunks and submit to the engine loop;
- `answers.py`: match the engine loop's outcomes to submitted jobs, write each answer (result
  or dead letter) to the pipeline's sinks, and mark its offset answered once all have it;
- `commits.py`: commit answered positions (and, exactly-once, the answers they cover) when due,
  backing off when a commit fails; let go of revoked and lost partitions;
- `maintenance.py`: on the engine loop's thread between steps, apply adapter updates and
  unload versions no job holds.

Words: a message is *answered* once its answer is written, or held by the sink for the
transaction that commits its offset; a job is *submitted* from its handing to the engine loop
until its outcome arrives or its partition is let go.
"""
