"""The launcher: the only code in kolora that knows Slurm.

    plan.py     stage graph + cluster profile → one submitit parameter set per job (pure; --dry-run prints it)
    submit.py   queues the jobs with submitit (afterok chain, render as one array) and records them
    jobs.py     what runs inside each job: load the frozen config, call pipeline.run_stage
    monitor.py  status / logs / cancel from the manifest, sacct/squeue and the run directory
    cluster_check.py  what the cluster allows (sinfo partitions, scontrol MaxArraySize), before queueing
"""
