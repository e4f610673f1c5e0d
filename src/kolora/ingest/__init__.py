"""Datasets: the sources `data:` can name (read, checked, downloaded) and the ingest stage -> run/data/."""
