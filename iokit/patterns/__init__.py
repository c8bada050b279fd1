"""The logic of the polling and push example servers, kept apart from their I/O so that it can be tested alone.

* ``limits``: every bound of these servers, in one place (each is a command-line flag of the servers).
* ``jobs``: the job table (states, versions, queue, retention, idempotency keys) and the registry of held long polls.
* ``sse``: Server-Sent Events: the event ring, per-subscriber queues and slow-consumer policies, the wire format, and a
  parser for the client side.

``examples/jobs_server.py`` and ``examples/push_server.py`` are the servers; ``docs/patterns.md`` (sections 3-5)
explains the patterns.
"""
