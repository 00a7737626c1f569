"""``tokenflow farm JOBS... --ray ADDRESS|local``: many job files on a Ray cluster (docs/farm.md).

The driver validates every job (``jobfile.load.load_jobs``: all problems at once, exit 2, nothing is
submitted), connects to Ray (``--ray local`` starts a private cluster on this machine), submits one
Ray task per job and writes a JSON report of every job's status, attempts, times and outputs.

Each task runs its job in a child process::

    python -c "<die_with_parent(), then tokenflow.app.cli.main(argv)>" \\
        run JOB --checkpoint-root ROOT --resume --log-json [--overwrite]

that is ``tokenflow run`` with one job; the child dies with its Ray worker (Linux: the parent-death
signal is SIGTERM, so it saves a checkpoint at the end of its current step and exits 75). A crash,
an out-of-memory kill or a lost worker therefore never takes the driver down, and every retry
resumes from the job's checkpoint (``ROOT/<job name>``; the job's own ``checkpoint_dir`` if it sets
one). Retries:

- the worker process dies (killed, OOM-killed, node lost): Ray runs the task again (``max_retries``);
  the new attempt first waits for the previous attempt's child (same machine: it was sent SIGTERM
  and is saving its checkpoint; another machine: its output locks must be released or stale);
- the child exits 75 or 130 (interrupted) or is killed by a signal: the task reruns it itself;
- any other exit code (2 config, 3 input, 4 model, 5 output, 6 out of memory, 7 locked by a
  worker of another run, 1 internal error) is final: retrying would not change it.
One budget counts both: at most ``--max-retries`` + 1 child runs per job.

Per job the task keeps ``ROOT/_farm/<job>.json`` (written atomically: the run id, every attempt's
host, Ray worker pid, child pid, exit code and outcome, the last progress event, the result) and
appends the child's stderr to ``ROOT/_farm/<job>.log`` and its JSON events to
``ROOT/_farm/<job>.events.jsonl``. Job files, inputs, outputs and ROOT must be on storage every
node sees at the same paths (a shared filesystem) for a cluster of several machines.

Ray is optional: ``pip install 'tokenflow[farm]'``. Nothing here imports it at module level.

Modules: ``cli`` (the flags, checks before submitting), ``driver`` (Ray, the tasks, the report),
``task`` (one job's Ray task: its attempts), ``child`` (the child process's entry point),
``status`` (the per-job files and exit codes both sides read).
"""
