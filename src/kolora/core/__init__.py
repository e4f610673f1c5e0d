"""What every part of kolora stands on: errors, the config, the run directory and its lock, stop signals, the stage contract."""
