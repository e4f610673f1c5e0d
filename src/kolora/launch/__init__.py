"""The launcher: the only code in kolora that knows Slurm.

    cluster.py        cluster profiles (slurm/clusters/<name>.yaml) and the Slurm jobs a run is queued as
    container.py      a stage inside the Apptainer image: its argument list, binds and environment
    memplan.py        each GPU stage's peak memory, estimated before anything is queued
    plan.py           stages + cluster profile → one submitit parameter set per job (pure; --dry-run prints it)
    cluster_check.py  what the cluster allows (sinfo partitions, scontrol MaxArraySize), before queueing
    submit.py         queues the jobs with submitit (afterok chain, render as one array) and records them
    jobs.py           what runs inside each job: the frozen config, each stage by how it spreads over processes
    supervise.py      the host side of every job: signals, requeue, attempts
    child.py          the stage process a job's host starts (maybe inside the container)
    monitor.py        status / logs / cancel from the manifest, sacct/squeue and the run directory
    sweep.py          a sweep as one submission; sweep_status.py: `kolora status SWEEP`
"""
