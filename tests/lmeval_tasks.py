"""Local lm-eval tasks (no download): two multiple-choice tasks, a generation task and a rolling-perplexity
task, written as YAML plus JSON-lines data into a folder for `--include` / `TaskManager(include_path=...)`.

The data are facts anyone can check (capitals, opposites), written here rather than fetched, so the tests
and `bench/lmeval_local.sh` run offline. This module imports no pytest: bench scripts use it too.
"""

from __future__ import annotations

import json
from pathlib import Path

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("Greece", "Athens"),
            ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Ireland", "Dublin"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Thailand", "Bangkok"),
            ("China", "Beijing"), ("India", "New Delhi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
            ("Argentina", "Buenos Aires"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen"),
            ("Belgium", "Brussels"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
            ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Colombia", "Bogota"), ("Ukraine", "Kyiv"),
            ("Czechia", "Prague"), ("Vietnam", "Hanoi"), ("Philippines", "Manila"), ("Indonesia", "Jakarta"),
            ("South Korea", "Seoul")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"),
             ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("early", "late"), ("rich", "poor"),
             ("old", "young"), ("wet", "dry"), ("hard", "soft"), ("full", "empty"), ("loud", "quiet"),
             ("strong", "weak"), ("thick", "thin"), ("high", "low"), ("clean", "dirty"), ("true", "false"),
             ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("love", "hate"), ("begin", "end"),
             ("left", "right"), ("inside", "outside"), ("above", "below"), ("first", "last"), ("heavy", "light"),
             ("near", "far"), ("safe", "dangerous"), ("cheap", "expensive"), ("long", "short"), ("north", "south"),
             ("east", "west"), ("question", "answer"), ("friend", "enemy"), ("arrive", "leave"), ("accept", "refuse")]
MC_TASKS = ("xq_capitals", "xq_opposites")


def _choices(answers: list[str], i: int, n: int = 4) -> tuple[list[str], int]:
    """The right answer and the next n−1 answers of the list as distractors, rotated so the gold index varies."""
    picked = [answers[(i + k) % len(answers)] for k in range(n)]
    gold = i % n
    picked[0], picked[gold] = picked[gold], picked[0]
    return picked, gold


def _rows() -> dict[str, list[dict]]:
    cities = [c for _, c in CAPITALS]
    opposites = [o for _, o in OPPOSITES]
    capitals = []
    for i, (country, _) in enumerate(CAPITALS):
        choices, gold = _choices(cities, i)
        capitals.append({"question": f"What is the capital of {country}?", "choices": choices, "gold": gold})
    opp = []
    for i, (word, _) in enumerate(OPPOSITES):
        choices, gold = _choices(opposites, i)
        opp.append({"word": word, "choices": choices, "gold": gold})
    gen = [{"country": country, "capital": city} for country, city in CAPITALS]
    text = [{"text": f"The capital of {country} is {city}. " * 3} for country, city in CAPITALS[:8]]
    return {"xq_capitals": capitals, "xq_opposites": opp, "xq_capitals_gen": gen, "xq_rolling": text}


_YAML = {
    "xq_capitals": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
    "xq_opposites": """output_type: multiple_choice
doc_to_text: "The opposite of {{word}} is"
doc_to_choice: "{{choices}}"
target_delimiter: " "
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "xq_capitals_gen": """output_type: generate_until
doc_to_text: "The capital of {{country}} is"
doc_to_target: " {{capital}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "^\\\\s*(.*?)\\\\s*$"
      - function: take_first
""",
    "xq_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
}


def write_tasks(folder: Path) -> Path:
    """Write every local task (YAML + data, absolute paths) into `folder`; returns it."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in _rows().items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
                f"test_split: test\n")
        (folder / f"{name}.yaml").write_text(head + _YAML[name] + "metadata:\n  version: 1.0\n", encoding="utf-8")
    return folder
