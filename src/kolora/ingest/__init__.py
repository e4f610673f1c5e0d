"""The ingest stage: any supported dataset -> run/data/."""
