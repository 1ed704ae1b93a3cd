"""The decode engine: sampling, per-row text and stop strings, the generation loop, session files, the
CUDA-graph decode path, and the plain data of its readouts (rendered by `xqcli.readouts.stats`)."""

from xqcli.engine.loop import DEFAULT_CONTEXT, DEFAULT_PREFILL_CHUNK, FINISH_REASONS, Engine, Step, collect
from xqcli.engine.sampling import SETTABLE, SamplingParams, parse_setting, sample
from xqcli.engine.session import load_session, model_identity, save_session
from xqcli.engine.stats import GenerationStats, MemoryReport

__all__ = ["DEFAULT_CONTEXT", "DEFAULT_PREFILL_CHUNK", "FINISH_REASONS", "SETTABLE", "Engine", "GenerationStats",
           "MemoryReport", "SamplingParams", "Step", "collect", "load_session", "model_identity", "parse_setting",
           "sample", "save_session"]
