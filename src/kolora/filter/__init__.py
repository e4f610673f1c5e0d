"""The filter stage: header checks, Data-Juicer, run/trainset/."""
