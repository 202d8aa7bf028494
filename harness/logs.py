"""Quiet logs by default, in the CLI process and in every Ray trial worker.

Our own progress bars and summaries say what happens; library chatter (weight-loading bars,
deprecation warnings, INFO lines) only shows with ``--verbose``. The driver exports the choice in
``HARNESS_VERBOSE`` so that Ray workers started from it make the same one.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "HARNESS_VERBOSE"


def quiet_logs(verbose: bool | None = None) -> None:
    """Silence library logs unless ``verbose`` (default: the ``HARNESS_VERBOSE`` environment variable)."""
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV, "") == "1"
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # ...which MLflow reads once, at import: a library imported before this call logs its INFO
    # lines anyway (e.g. "Updating database tables" when a store is opened)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # "🏃 View run … at: http://…" after every run a tracking server holds (the summary says where)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # MLflow's artifact download bars (`harness eval RUN_ID`, `harness tables --experiment`)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Ray's notice on every start that its token authentication is on (it stays on), and Tune's
    # "`process_trial_result` took 0.5 s ... a performance bottleneck" (that is the driver's
    # MLflow write of a result, on a loaded machine; nothing for a user to act on)
    for name in ("ray._private.authentication.authentication_token_setup", "ray.tune.utils.util"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # A trial that fails and is retried (resources.max_failures): Tune logs the error with its
    # traceback; the driver says it in one line (and the final failure in the summary).
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    quiet_ray_worker()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


# Loggers of Ray's workers that a sweep silences (unless HARNESS_VERBOSE): Ray Train's
# placement-group cleaner asks Ray's state API (the dashboard's) once a second whether the trainer
# still runs, and warns when it cannot (without the dashboard it never can); Tune and Train say
# every checkpoint they keep and every restore at INFO (the driver says a resume in one line).
RAY_WORKER_LOGS = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    "ray.tune.trainable.trainable",
    "ray.train._internal.storage",
    "ray.train.v2._internal.execution.storage",
)


def quiet_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for a sweep's workers (quiet unless
    ``HARNESS_VERBOSE``)."""
    if os.environ.get(VERBOSE_ENV, "") != "1":
        for name in RAY_WORKER_LOGS:
            logging.getLogger(name).setLevel(logging.ERROR)
