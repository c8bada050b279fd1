"""A resumable upload server: the subset of tus 1.0.0 that ``examples/upload_server.py`` serves, on every backend.

The parts, each usable alone:

* ``protocol``: the tus headers, parsed and checked without I/O (what a malformed request gets, and why);
* ``files``: what an upload is on disk (a data file and an atomically replaced record), and the syncs that make it
  durable;
* ``store``: the table of uploads, chunks being written, and the two durability modes (``sync``: fdatasync and record
  before the 204; ``async``: acknowledge from memory, a flusher syncs every 200 ms);
* ``server``: the routes on the shared HTTP core, and the service that serves them with the store's lifespan;
* ``replication``: a primary's chunks on its replicas, sync (the 204 waits for them) or async (a sender per replica,
  a bounded backlog, the lag in ``GET /stats``);
* ``limits``: every bound, in one place.

See ``docs/patterns.md`` section 2 for the protocol as served, the durability trade-off and its measured cost.
"""

from .limits import DEFAULT_UPLOAD_LIMITS, UploadLimits
from .store import Durability, Upload, UploadStore

__all__ = ["DEFAULT_UPLOAD_LIMITS", "Durability", "Upload", "UploadLimits", "UploadStore"]
