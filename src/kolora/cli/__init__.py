"""The `kolora` command."""
