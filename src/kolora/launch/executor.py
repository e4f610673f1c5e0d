"""submitit's SlurmExecutor for a job whose node count may be Slurm's range (`--nodes=1-2`).

Imported only where a job is queued (kolora.launch.submit / sweep import it when they submit): submitit stays
out of the login node's CLI start-up.
"""

from __future__ import annotations

from submitit import SlurmExecutor

from kolora.launch.cluster import parse_nodes


class RangeSlurmExecutor(SlurmExecutor):
    """submitit writes `nodes` into `#SBATCH --nodes=` as it is (a "MIN-MAX" range reaches sbatch unchanged),
    but also multiplies it by ntasks_per_node for the job's list of tasks (whose result files it reads back),
    which breaks on a string. The range is counted at its MAX: the most tasks the job can have; kolora never
    waits for a task's result, the job's stages report through the run directory."""

    def _num_tasks(self) -> int:
        _, most = parse_nodes(self.parameters.get("nodes", 1))
        per_node = self.parameters.get("ntasks_per_node", 1)
        for arg in self.parameters.get("srun_args") or []:  # a range's tasks per node go to srun (launch.plan)
            if arg.startswith("--ntasks-per-node="):
                per_node = int(arg.split("=", 1)[1])
        return most * max(1, per_node)
