"""What every process shares (settings, logs, storage, UIDs, queue); imports no other room."""
