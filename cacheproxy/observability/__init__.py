"""What operators see: logs (and, with the operations issue, metrics and the admin endpoints)."""
