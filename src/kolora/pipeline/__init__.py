"""The stage registry, stage keys and completion, and the runner that runs stages in order."""
