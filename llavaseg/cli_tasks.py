"""``--num-tasks N --task-index I``: one task of a job array (Slurm's ``--array``), for ``reason`` and ``infer``.

Task I takes the shards I, I + N, I + 2N, ... of the run (numbered over every manifest, in order), and only those: a
static split, so tasks that the scheduler runs one after another never wait for each other. Shard leases
(``shared.leases``) still keep two processes from writing one shard, whichever way they were started.
"""

from __future__ import annotations

import argparse

from shared.leases import JobSlice


def add_task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-tasks", type=int, default=None, metavar="N",
                        help="split the shards among N tasks of a job array; this one takes shards I, I+N, ...")
    parser.add_argument("--task-index", type=int, default=None, metavar="I",
                        help="this task's index, 0..N-1 (e.g. $SLURM_ARRAY_TASK_ID for --array=0-<N-1>)")


def job_slice(args: argparse.Namespace, command: str) -> JobSlice:
    """The task's share of the shards; a ValueError (exit 2) for flags that do not make one."""
    num_tasks, task_index = getattr(args, "num_tasks", None), getattr(args, "task_index", None)
    if num_tasks is None and task_index is None:
        return JobSlice()
    if num_tasks is None or task_index is None:
        raise ValueError(f"{command}: --num-tasks and --task-index go together (got only "
                         f"{'--num-tasks' if task_index is None else '--task-index'})")  # fmt: skip
    job = JobSlice(task_index, num_tasks)
    if job.count > 1 and getattr(args, "input", None):
        raise ValueError(f"{command} --input: --num-tasks/--task-index split configured manifests; split the table instead")
    return job
