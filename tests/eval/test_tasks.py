import json
import sys

import pytest

from megatron_ntp.config import ConfigError
from megatron_ntp.eval.tasks import (
    cut_at_stop,
    default_ks,
    load_tasks,
    resolve_checker,
    score_tasks,
)


def test_scores_by_hand_m5_c2():
    tasks = [{"id": 1, "prompt": "2+2=", "answer": "4"}]
    completions = [["4", "5", " 4 ", "four", ""]]  # exact: "4" and " 4 " are right -> c = 2
    r = score_tasks(tasks, completions, resolve_checker("exact"), [1, 2, 3, 4, 5])
    assert r["per_task"][0]["correct"] == 2
    assert r["pass@k"] == pytest.approx({"1": 2 / 5, "2": 7 / 10, "3": 9 / 10, "4": 1.0,
                                          "5": 1.0})
    assert r["avg@5"] == pytest.approx(0.4)
    assert r["cons@5"] == 1.0  # "4" has 2 votes, "5" and "four" one each
    assert [c["correct"] for c in r["per_task"][0]["completions"]] == [True, False, True,
                                                                       False, False]


def test_numeric_checker_and_means_over_tasks():
    tasks = [{"id": "a", "prompt": "", "answer": "7/2"}, {"id": "b", "prompt": "", "answer": "3"}]
    completions = [["so 3.5", "3.50", "4", "x"], ["1", "2", "2", "3"]]
    r = score_tasks(tasks, completions, resolve_checker("numeric"), [1, 4])
    assert [t["correct"] for t in r["per_task"]] == [2, 1]
    assert r["pass@k"]["1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert r["pass@k"]["4"] == 1.0
    assert r["avg@4"] == pytest.approx((0.5 + 0.25) / 2)
    assert r["cons@4"] == pytest.approx(0.5)  # task a votes 7/2 (2 of 4); task b votes 2


def test_custom_checker_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        "def same_lower(answer, reference):\n"
        "    return answer.lower() == reference.lower()\n"
        "same_lower.extract = lambda text: text.split()[0] if text.split() else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    checker = resolve_checker("my_checks:same_lower")
    r = score_tasks([{"id": 0, "prompt": "", "answer": "Paris"}],
                    [["paris is it", "Lyon", "PARIS"]], checker, [1])
    assert r["per_task"][0]["correct"] == 2
    sys.modules.pop("my_checks", None)


@pytest.mark.parametrize("spec, message", [("nope", "module:function"),
                                           ("no_such_module_xyz:f", "cannot import"),
                                           ("json:no_such_function", "no function")])
def test_bad_checker_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_checker(spec)


def test_load_tasks_names_the_bad_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "answer": 2}) + "\n\n"
                    + json.dumps({"prompt": "2+2="}) + "\n")
    with pytest.raises(ConfigError, match=r"t.jsonl:3: needs a field 'answer'"):
        load_tasks(str(path))
    path.write_text(json.dumps({"prompt": "1+1=", "reference": 2, "id": "x"}) + "\n")
    assert load_tasks(str(path)) == [{"id": "x", "prompt": "1+1=", "answer": "2"}]


def test_stop_strings_and_default_ks():
    assert cut_at_stop("12\n13", ["\n"]) == "12"
    assert cut_at_stop("a.b;c", [";", "."]) == "a"
    assert cut_at_stop("abc", []) == "abc"
    assert default_ks(5) == [1, 2, 4, 5]
    assert default_ks(1) == [1]
    with pytest.raises(ConfigError, match="between 1 and"):
        score_tasks([{"id": 0, "prompt": "", "answer": "1"}], [["1"]],
                    resolve_checker("exact"), [2])


def test_completion_text_keeps_the_space_the_prompt_boundary_carries():
    from megatron_ntp.eval.programs import completion_text

    pieces = {1: "▁2", 2: "▁+", 3: "▁3", 4: "▁=", 5: "▁5", 6: "0"}

    class Tokenizer:  # sentencepiece-like: a word's piece carries its space, dropped at the start
        def detokenize(self, ids):
            return "".join(pieces[i] for i in ids).replace("▁", " ").lstrip(" ")

    assert completion_text(Tokenizer(), [1, 2, 3, 4], [5, 6]) == " 50"
    assert Tokenizer().detokenize([5, 6]) == "50"  # decoding the completion alone drops it
