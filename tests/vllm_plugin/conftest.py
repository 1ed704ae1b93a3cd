"""tests/vllm_plugin runs only in the vLLM venv (`scripts/test-vllm.sh`): vLLM is heavy and pins its own torch."""

import importlib.util
from pathlib import Path

# Checked without importing vLLM, so collecting the default suite stays cheap.
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """Leave this folder's test files out where vLLM is not installed."""
    if not HAS_VLLM and collection_path.suffix == ".py" and collection_path.parent == Path(__file__).parent:
        return True
    return None
