"""lm-evaluation-harness through xq caches: scoring through the cache, the `xq` LM, local tasks, `xq eval --tasks`."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import assets
import lmeval_tasks
import pytest
import torch
import torch.nn.functional as F
from schemas import assert_valid

from xqcli.cache.spec import CacheSpec
from xqcli.cli import main
from xqcli.load import load, load_hf_folder
from xqcli.readouts.scoring import score, truncate

pytest.importorskip("lm_eval")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, err)


def direct_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Reference: one cache-less forward of context + continuation (what lm-eval's hf model computes)."""
    logp = F.log_softmax(model(torch.tensor([ctx + cont])[:, :-1])[0, len(ctx) - 1:].float(), -1)
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def random_requests(n_vocab: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (9, 1), (2, 4), (30, 2), (1, 1), (17, 6)]
    return [(torch.randint(3, n_vocab, (n,), generator=g).tolist(), torch.randint(3, n_vocab, (k,), generator=g).tolist())
            for n, k in shapes]


@pytest.fixture(scope="module")
def tiny_llama():
    return load_hf_folder(assets.tiny_hf("llama"))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return lmeval_tasks.write_tasks(tmp_path_factory.mktemp("lmeval-tasks"))


@pytest.fixture(scope="module")
def tiny_gguf():
    return str(assets.tiny_gguf("llama"))


# ----------------------------------------------------------------------------- scoring through the cache


def test_kv_scoring_equals_one_plain_forward(tiny_llama):
    reqs = random_requests(256)
    got = score(tiny_llama, CacheSpec.parse("kv"), reqs, batch_size=4)  # mixed lengths share batches
    for s, (ctx, cont) in zip(got, reqs):
        logprob, greedy = direct_logprob(tiny_llama, ctx, cont)
        assert s.logprob == pytest.approx(logprob, abs=1e-4) and s.greedy == greedy


@pytest.mark.parametrize("kind", ["xquant-4", "kivi-2", "xquant-cl-3"])
def test_quantized_scoring_goes_through_the_quantized_cache(tiny_llama, kind):
    reqs = random_requests(256)
    alone = score(tiny_llama, CacheSpec.parse(kind), reqs, batch_size=1)
    batched = score(tiny_llama, CacheSpec.parse(kind), reqs, batch_size=4)
    # rows do not see each other: a request scores the same alone and in a padded batch
    assert [s.logprob for s in batched] == pytest.approx([s.logprob for s in alone], abs=1e-4)
    # the continuation attends over quantized tokens: every request moves, even one-token contexts
    # (their only context token is quantized too)
    for s, (ctx, cont) in zip(alone, reqs):
        assert abs(s.logprob - direct_logprob(tiny_llama, ctx, cont)[0]) > 1e-4


def test_unquantized_kinds_score_as_kv(tiny_llama):
    reqs = random_requests(256)
    kv = score(tiny_llama, CacheSpec.parse("kv"), reqs)
    for kind in ("xquant-fp", "kivi-fp"):
        assert [s.logprob for s in score(tiny_llama, CacheSpec.parse(kind), reqs)] == pytest.approx(
            [s.logprob for s in kv], abs=1e-4)


def test_truncation_keeps_the_continuation_and_one_context_token():
    assert truncate([1, 2, 3, 4], [5, 6], 4) == ([2, 3, 4], [5, 6])
    assert truncate([1, 2], [3, 4, 5], 3) == ([2], [3, 4, 5])
    with pytest.raises(Exception, match="does not fit"):
        truncate([1], [2, 3, 4], 2)


# ----------------------------------------------------------------------------- the `xq` lm-eval model


def test_xqlm_rolling_and_generation(tiny_gguf):
    from lm_eval.api.instance import Instance

    from xqcli.lmeval.model import XQLM

    loaded = load(tiny_gguf)
    lm = XQLM(loaded=loaded, cache="kv", batch_size=2, max_length=16)
    text = "the cat sat on the mat and the dog sat on the log"
    ids = lm.tok_encode(text)
    assert 17 <= len(ids) <= 32  # two rolling windows of 16 positions
    first = direct_logprob(loaded.model, [lm.prefix_token_id], ids[:16])[0]
    # the second window predicts the rest, each token after the 16 positions before it
    second = direct_logprob(loaded.model, ids[len(ids) - 17:16], ids[16:])[0]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert got == pytest.approx(first + second, abs=1e-4)
    gen = lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": ["\n"], "max_gen_toks": 5}), 0),
                             Instance("generate_until", {}, ("a dog", {"until": ["zzz"], "max_gen_toks": 3}), 1)])
    assert len(gen) == 2 and all(isinstance(t, str) for t in gen) and "\n" not in gen[0]


def test_xq_is_a_registered_lm_eval_model(tiny_gguf, tasks_dir, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import xqcli.lmeval.model  # noqa: F401  (registers "xq")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(model="xq", model_args=f"pretrained={tiny_gguf},cache=xquant-4,batch_size=2",
                                  tasks=["xq_opposites"], limit=2, task_manager=TaskManager(include_path=str(tasks_dir)),
                                  log_samples=False)
    assert out["n-samples"]["xq_opposites"]["effective"] == 2 and "acc,none" in out["results"]["xq_opposites"]


def test_xqlm_refuses_two_sources():
    from xqcli.errors import InputError
    from xqcli.lmeval.model import XQLM

    with pytest.raises(InputError, match="exactly one of"):
        XQLM()


# ----------------------------------------------------------------------------- xq eval --tasks (local tasks)


def test_eval_tasks_on_local_tasks_for_kv_and_xquant(capsys, tiny_gguf, tasks_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    names = "xq_capitals,xq_opposites,xq_capitals_gen,xq_rolling"
    code, out, err = run(capsys, "eval", tiny_gguf, "--tasks", names, "--include", str(tasks_dir), "--limit", "3",
                         "-c", "kv,xquant-4", "--batch-size", "2", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert_valid(obj, "eval")
    got = {(s["task"], s["metric"], s["cache"]): s for s in obj["scores"]}
    for cache in ("kv", "xquant-4"):
        for task, metric in (("xq_capitals", "acc"), ("xq_capitals", "acc_norm"), ("xq_opposites", "acc"),
                             ("xq_capitals_gen", "exact_match"), ("xq_rolling", "bits_per_byte")):
            s = got[(task, metric, cache)]
            assert s["samples"] == 3 and 0 <= s["value"] and (metric == "bits_per_byte" or s["value"] <= 1)
    # perplexity sees the quantized cache: the two kinds differ, xquant-4 is the worse
    assert got[("xq_rolling", "bits_per_byte", "xquant-4")]["value"] > got[("xq_rolling", "bits_per_byte", "kv")]["value"]
    code, out, err = run(capsys, "eval", tiny_gguf, "--tasks", "xq_opposites", "--include", str(tasks_dir),
                         "--limit", "2", "-c", "kv,xquant-4", "--format", "md")
    assert code == 0, err
    assert "| task | metric | n | kv | xquant-4 |" in out and "xq_opposites" in out
    # CSV: the value and its stderr as numbers per cache kind, those of --json for the same run
    args = ["eval", tiny_gguf, "--tasks", "xq_opposites", "--include", str(tasks_dir), "--limit", "2", "-c",
            "kv,xquant-4"]
    code, out, err = run(capsys, *args, "--format", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["task", "metric", "n", "kv", "kv stderr", "xquant-4", "xquant-4 stderr"]
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    want = {(s["metric"], s["cache"]): s for s in json.loads(out)["scores"]}
    for row in rows:
        assert int(row["n"]) == 2
        for cache in ("kv", "xquant-4"):
            s = want[(row["metric"], cache)]
            assert float(row[cache]) == s["value"]
            assert row[f"{cache} stderr"] == "" if s["stderr"] is None else float(row[f"{cache} stderr"]) == s["stderr"]


@pytest.mark.parametrize("extra,needle", [
    (["--tasks", "no_such_task_xq"], "unknown lm-eval task"),
    (["--tasks", "xq_capitals", "--include", "MISSING"], "not a folder"),
    (["--tasks", "xq_capitals", "--task", "passkey"], "separate runs"),
])
def test_eval_tasks_bad_input(capsys, tiny_gguf, tmp_path, extra, needle):
    extra = [a.replace("MISSING", str(tmp_path / "nope")) for a in extra]
    code, _, err = run(capsys, "eval", tiny_gguf, "-c", "kv", *extra)
    assert code == 2
    one_error(err, needle)


def test_missing_lm_eval_is_exit_6(capsys, tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    code, _, err = run(capsys, "eval", tiny_gguf, "--tasks", "xq_capitals", "-c", "kv")
    assert code == 6
    one_error(err, "pip install 'xqcli[lmeval]'")


def test_task_dataset_not_cached_offline_is_exit_5(capsys, tiny_gguf, tmp_path, monkeypatch):
    """A task whose hub dataset is not cached, offline: exit 5 naming the dataset and how to cache it (was exit 1)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 set at import
    (tmp_path / "xq_hub.yaml").write_text(
        "task: xq_hub\ndataset_path: xq-test-nobody/not-a-dataset\ntest_split: test\n"
        + lmeval_tasks._YAML["xq_capitals"] + "metadata:\n  version: 1.0\n", encoding="utf-8")
    code, out, err = run(capsys, "eval", tiny_gguf, "--tasks", "xq_hub", "--include", str(tmp_path), "-c", "kv")
    assert code == 5 and out == ""
    one_error(err, "lm-eval task xq_hub", "dataset xq-test-nobody/not-a-dataset is not in the local cache",
              "HF_HUB_OFFLINE", "--online")


@pytest.mark.parametrize("module,name,message,needle", [
    ("huggingface_hub.errors", "OfflineModeIsEnabled", "offline", "not in the local cache"),
    ("huggingface_hub.errors", "LocalEntryNotFoundError", "no file", "not in the local cache"),
    ("datasets.exceptions", "DatasetNotFoundError", "Dataset 'org/gone' doesn't exist on the Hub",
     "dataset org/gone was not found on the hub"),
])
def test_task_manager_turns_dataset_hub_errors_into_exit_5(monkeypatch, module, name, message, needle):
    import importlib

    from lm_eval.tasks import TaskManager

    from xqcli.errors import HubError
    from xqcli.lmeval.run import task_manager

    def fail(self, task_list):
        raise getattr(importlib.import_module(module), name)(message)

    monkeypatch.setattr(TaskManager, "load", fail)
    with pytest.raises(HubError) as e:
        task_manager(None).load(["arc_easy"])
    assert e.value.exit_code == 5 and "lm-eval task arc_easy" in str(e.value) and needle in str(e.value)


def test_the_cli_does_not_import_lm_eval():
    code = "import sys, xqcli.cli, xqcli.lmeval, xqcli.commands.eval_cmd; assert 'lm_eval' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- equal to lm-eval's own hf model


@pytest.mark.slow
def test_kv_loglikelihoods_equal_lm_evals_hf_model(smollm2_dir, tasks_dir):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (the test extra should bring it)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from xqcli.lmeval.model import XQLM

    docs = [json.loads(line) for line in (tasks_dir / "xq_capitals.jsonl").read_text().splitlines()[:4]]
    reqs = [Instance("loglikelihood", d, (f"Question: {d['question']}\nAnswer:", " " + c), i)
            for i, d in enumerate(docs) for c in d["choices"]]
    reqs.append(Instance("loglikelihood", {}, ("", "The capital of France is Paris."), len(reqs)))  # empty context
    hf = HFLM(pretrained=str(smollm2_dir), dtype="float32", device="cpu", batch_size=4)
    want = hf.loglikelihood(reqs)
    kv = XQLM(pretrained=str(smollm2_dir), cache="kv", batch_size=3, device="cpu", dtype="float32")
    got = kv.loglikelihood(reqs)
    assert [g for _, g in got] == [g for _, g in want]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4
    xq4 = XQLM(loaded=kv.loaded, cache="xquant-4", batch_size=3).loglikelihood(reqs)
    assert max(abs(a - b) for (a, _), (b, _) in zip(xq4, want)) > 1e-3  # the quantized cache is in the path
