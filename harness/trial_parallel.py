"""A trial on several workers: a Ray Train ``TorchTrainer`` started by the Tune trial.

With ``resources.workers_per_trial: N > 1`` the Tune trial holds no resources itself; it starts a
``TorchTrainer`` of N workers, each with ``gpus_per_trial`` GPUs (else ``cpus_per_trial`` CPUs),
in one placement group (Ray Train's ``ScalingConfig``), and Ray Train sets up ``torch.distributed``
among them (NCCL on GPUs, gloo on CPUs). Every worker runs the same trial (same seed, model and
schedule) on its shard of each global batch of ``train.batch_size`` (``harness/distributed.py``),
so the trial's result is the one-worker run's, up to float rounding, and so is its trial key.

Rank 0 alone reports, checkpoints, scores the held-out rows, saves and evaluates; the others
return after the last training step. Its results reach Tune through a Ray queue that the Tune trial
drains into ``tune.report`` (a checkpoint's state through the object store, made a Tune checkpoint
by the Tune trial, so no node needs another's disk), so the driver's callback sees the same step,
note, checkpoint and final results as from a one-worker trial. A retry resumes every worker from
the trial's last checkpoint. Not ``ray.train.report``: that is a barrier every worker must reach the same
number of times, and only rank 0 has anything to report after training.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from harness.config import ResourceSettings
from harness.logs import VERBOSE_ENV
from harness.trial import CHECKPOINT, report_to_tune

POLL_S = 0.5  # how often the Tune trial looks whether the workers are done


def run_workers(resources: ResourceSettings, run: Callable[..., None]) -> None:
    """Run ``run(send=..., parallel=...)`` on ``resources.workers_per_trial`` Ray Train workers and
    pass rank 0's results to ``tune.report``; raise the first failed worker's error."""
    from ray import train, tune
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    results: Queue = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"run": run, "results": results},
        scaling_config=train.ScalingConfig(
            num_workers=resources.workers_per_trial,
            use_gpu=resources.gpus_per_trial > 0,
            resources_per_worker=resources.per_worker(),
            placement_strategy=resources.placement_strategy,
        ),
        run_config=train.RunConfig(
            name="workers",
            logging_config=train.LoggingConfig(
                "INFO" if os.environ.get(VERBOSE_ENV) == "1" else "WARNING"
            ),
            storage_path=tune.get_context().get_trial_dir(),
            # a failed trial is retried whole by Tune (resources.max_failures)
            failure_config=train.FailureConfig(max_failures=0),
        ),
    )
    failed: list[BaseException] = []
    done = threading.Event()

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # raised below, in the Tune trial's own thread
            failed.append(e)
        finally:
            done.set()

    # tune.report must run in the trial's thread, so the trainer waits in another one
    fitting = threading.Thread(target=fit, name="harness-workers", daemon=True)
    fitting.start()
    try:
        while True:
            try:
                report_to_tune(_fetched(results.get(timeout=POLL_S)))
            except Empty:
                if done.is_set() and results.empty():
                    break
        fitting.join()
    finally:
        results.shutdown()
    if failed:
        raise worker_error(failed[0])


def worker_error(error: BaseException) -> BaseException:
    """The error of the lowest failed rank (what one worker would have raised), else ``error``."""
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
    if not failures:
        return error
    first = failures[min(failures)]
    return getattr(first, "cause", None) or first  # Ray wraps a worker's exception


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: this rank's part of the trial; rank 0 queues its results."""
    from harness.distributed import DataParallel
    from harness.logs import quiet_logs

    quiet_logs()
    parallel = DataParallel.current()
    results = config["results"]
    config["run"](send=lambda result: results.put(_by_ref(result)), parallel=parallel)


def _by_ref(result: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's state travels through Ray's object store, not through the queue actor."""
    import ray

    if isinstance(result.get(CHECKPOINT), bytes):
        result = {**result, CHECKPOINT: [ray.put(result[CHECKPOINT])]}  # a list: not resolved
    return result


def _fetched(result: dict[str, Any]) -> dict[str, Any]:
    import ray

    if isinstance(result.get(CHECKPOINT), list):
        result = {**result, CHECKPOINT: ray.get(result[CHECKPOINT][0])}
    return result
