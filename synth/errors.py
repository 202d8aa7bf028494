"""Which of ``synth``'s errors a user can fix: the CLIs (and the harness's corpus stage) print these
as one line, never a traceback."""

from __future__ import annotations


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can fix (config, data, endpoint): one line each, never a traceback."""
    from synth.corpus import CorpusError
    from synth.llm import EndpointError
    from synth.locks import LockedError
    from synth.merge import MergeError
    from synth.mine_config import MineError
    from synth.outputs import OutputError
    from synth.packaged import PackagedModelError
    from synth.server import ServerError
    from synth.sources import SourceError
    from synth.synth_config import SynthConfigError
    from synth.templates import PromptError
    from synth.verify import VerifyError

    return (
        CorpusError,
        MineError,
        SourceError,
        PackagedModelError,
        SynthConfigError,
        EndpointError,
        ServerError,
        PromptError,
        LockedError,
        MergeError,
        VerifyError,
        OutputError,
    )
