"""lm-evaluation-harness through any xq cache kind (the `lmeval` extra: `pip install 'xqcli[lmeval]'`).

`xqcli.lmeval.model.XQLM` is an lm-eval `LM` registered as `xq` (`lm_eval --model xq --model_args
pretrained=DIR,cache=xquant-4` once `xqcli.lmeval.model` is imported, or `XQLM(...)` passed to
`lm_eval.simple_evaluate`); `xqcli.lmeval.run.run_tasks` is what `xq eval --tasks` calls. lm_eval is
imported only inside those modules, never by this package or the CLI, so a plain install stays light.
"""

from __future__ import annotations

from xqcli.errors import MissingDependencyError

INSTALL_HINT = "pip install 'xqcli[lmeval]'"


def require_lm_eval() -> None:
    """Import lm_eval or raise MissingDependencyError (exit 6) naming the extra."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"lm-evaluation-harness is not installed ({e})", hint=INSTALL_HINT) from None
