"""The saved state of an output folder's batches (OUTPUT_DIR/batch_state.sqlite): every batch is
recorded before anything waits on it, so a killed run, rerun, polls the batches it finds there and
resubmits none of their requests."""
import json

from .llm import durable_sqlite

STATE_FILE = "batch_state.sqlite"


class BatchState:
    """Every batch of an output folder, committed as it changes (WAL, synchronous=NORMAL: a commit
    survives the process being killed). A record: local_id, runner, endpoint, status (uploaded ->
    submitted -> read | lost), the custom_ids it holds, the worst case reserved per line, file and batch ids."""

    def __init__(self, path):
        self.db = durable_sqlite(path, "batches (local_id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, "
                                       "status TEXT NOT NULL, record TEXT NOT NULL)")

    def save(self, record: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?)",
                        (record["local_id"], record["endpoint"], record["status"], json.dumps(record)))
        self.db.commit()

    def open_records(self, endpoint: str) -> list[dict]:
        rows = self.db.execute("SELECT record FROM batches WHERE endpoint = ? AND status IN ('uploaded', 'submitted') "
                               "ORDER BY local_id", (endpoint,))
        return [json.loads(r[0]) for r in rows]

    def records(self) -> list[dict]:
        return [json.loads(r[0]) for r in self.db.execute("SELECT record FROM batches ORDER BY local_id")]

    def close(self) -> None:
        self.db.close()
