"""Task metrics: hand-computed values, parity with sacrebleu / rouge_score, the registry and its config checks."""

import math
import subprocess
import sys

import pytest

from nemo_customizer.evaluation import metrics as M
from nemo_customizer.evaluation.metrics import (
    METRICS, bleu, canonical_call, check_metrics, chrf, compute_generation_metrics, default_metrics, exact_match,
    function_name_accuracy, label_accuracy, label_set, match_label, normalize_squad, rouge_l, squad_exact_match,
    squad_f1, tool_call_exact_match,
)


# --- text metrics ----------------------------------------------------------------------------------------------


def test_exact_match_strips_whitespace_but_keeps_case():
    # " Paris\n"=="Paris" 1, "paris"!="Paris" 0, "Lyon"=="Lyon " 1, ""!="Nice" 0 → 2/4
    assert exact_match([" Paris\n", "paris", "Lyon", ""], ["Paris", "Paris", "Lyon ", "Nice"]) == 0.5


@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel-Tower, in Paris!", "eiffeltower in paris"),  # punctuation removed, not split on
    ("an apple a Day", "apple day"),
    ("theater Anthem", "theater anthem"),                         # articles only as whole words
    ("  A  ", ""),
    ("Levi's Stadium", "levis stadium"),
])
def test_normalize_squad(text, expected):
    assert normalize_squad(text) == expected


def test_squad_exact_match():
    # "the Eiffel Tower." ≡ "Eiffel tower" 1; "Tower" vs "Eiffel Tower" 0; "" ≡ "The" (both normalize to "") 1
    assert squad_exact_match(["the Eiffel Tower.", "Tower", ""], ["Eiffel tower", "Eiffel Tower", "The"]) == \
        pytest.approx(2 / 3)


@pytest.mark.parametrize("prediction, reference, expected", [
    # [eiffel tower in paris] vs [eiffel tower]: same 2, P 2/4, R 2/2 → F1 2·.5·1/1.5 = 2/3
    ("the Eiffel Tower in Paris", "Eiffel Tower", 2 / 3),
    # P 1/1, R 1/2 → 2/3
    ("Tower", "Eiffel Tower", 2 / 3),
    # multiset: paris×3 ∩ paris×1 → same 1; P 1/3, R 1/2 → 2·(1/6)/(5/6) = 0.4
    ("paris paris paris", "paris london", 0.4),
    ("London", "Paris", 0.0),
    ("", "The", 1.0),        # both empty after normalization: a correct "no answer"
    ("", "Paris", 0.0),
    ("Paris", "", 0.0),
    # SQuAD v1.1 dev (Super Bowl 50): same 3 of 11 predicted tokens; P 3/11, R 1 → (6/11)/(14/11) = 3/7
    ("Levi's Stadium in the San Francisco Bay Area at Santa Clara, California.", "Santa Clara, California", 3 / 7),
    ("the Denver Broncos", "Denver Broncos", 1.0),
    ("Broncos", "Denver Broncos", 2 / 3),
])
def test_squad_f1_cases(prediction, reference, expected):
    assert squad_f1([prediction], [reference]) == pytest.approx(expected)


def test_squad_f1_is_mean_over_examples():
    # (2/3 + 2/3 + 2/5) / 3 = 26/45
    predictions = ["the Eiffel Tower in Paris", "Tower", "paris paris paris"]
    references = ["Eiffel Tower", "Eiffel Tower", "paris london"]
    assert squad_f1(predictions, references) == pytest.approx(26 / 45)


def test_bleu_hand_computed():
    # every n-gram precision is 1 (6/6, 5/5, 4/4, 3/3); brevity penalty exp(1 - 7/6) → 100·e^(-1/6) ≈ 84.648
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat today"]) == pytest.approx(100 * math.exp(-1 / 6))
    assert bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)


def test_chrf_hand_computed():
    assert chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"]) == 0.0  # no character in common


PREDICTIONS = ["the cat sat on the mat", "a quick brown fox jumps", "hello there world", "Cats running"]
REFERENCES = ["the cat sat on a mat today", "the quick brown fox jumped over", "hello world", "the cat runs"]


def test_bleu_and_chrf_equal_sacrebleu_corpus_scores():
    import sacrebleu

    assert bleu(PREDICTIONS, REFERENCES) == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert chrf(PREDICTIONS, REFERENCES) == sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score
    # corpus BLEU is not the mean of sentence BLEU: a per-row average would give something else
    sentence_mean = sum(sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDICTIONS, REFERENCES)) / 4
    assert bleu(PREDICTIONS, REFERENCES) != pytest.approx(sentence_mean)


def test_rouge_l_hand_computed():
    # LCS 3 of [the cat sat] in [the cat sat on the mat]: P 1, R 1/2 → F 2/3
    # stemmed [cat run] vs [the cat run]: LCS 2, P 1, R 2/3 → F 0.8; mean (2/3 + 0.8)/2 ×100 = 73.33
    assert rouge_l(["the cat sat", "Cats running"], ["the cat sat on the mat", "the cat runs"]) == \
        pytest.approx(100 * (2 / 3 + 0.8) / 2)


def test_rouge_l_equals_rouge_score_times_100():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)) / 4
    assert rouge_l(PREDICTIONS, REFERENCES) == pytest.approx(100 * expected)


@pytest.mark.parametrize("metric", [exact_match, squad_exact_match, squad_f1, bleu, chrf, rouge_l])
def test_metrics_reject_unequal_or_empty_lists(metric):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        metric([], [])


@pytest.mark.parametrize("module, function", [("sacrebleu", bleu), ("sacrebleu", chrf),
                                              ("rouge_score.rouge_scorer", rouge_l)])
def test_missing_optional_dependency_names_the_extra(monkeypatch, module, function):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'nemo_customizer\[eval\]'"):
        function(["a"], ["a"])


def test_import_loads_neither_torch_nor_the_optional_metric_libraries():
    code = ("import sys, nemo_customizer.evaluation.metrics; "
            "print(sorted(m for m in ('torch', 'megatron', 'sacrebleu', 'rouge_score') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- labels ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("references, kwargs, expected", [
    # 2 distinct < 5 rows / 2
    (["positive", " negative\n", "positive", "negative", "positive"], {}, ("negative", "positive")),
    (["b", "a", "b", "a"], {}, None),                                   # 2 distinct is not < 4 / 2
    (["x", "y", "z"] * 4, {"max_labels": 2}, None),                    # 3 distinct > max_labels
    (["x", "y", "z"] * 4, {"max_labels": 3}, ("x", "y", "z")),
    (["one two three four five", "no"] * 3, {}, ("no", "one two three four five")),   # 5 words is short
    (["one two three four five six", "no"] * 3, {}, None),                            # 6 words is text
    (["line one\nline two", "no"] * 3, {}, None),
    (["", "no"] * 3, {}, None),                                          # an empty completion is no label
    ([], {}, None),
])
def test_label_set(references, kwargs, expected):
    assert label_set(references, **kwargs) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("fresh", "fresh"),
    ("fresh.", "fresh"),
    ("Rotten", "rotten"),
    ("  FRESH \n", "fresh"),
    ("fresh, I think", "fresh"),
    ("rotten\nBecause ...", "rotten"),
    ("freshly", None),         # a label followed by a letter is another word
    ("It is fresh", None),     # only a prefix counts
    ("", None),
])
def test_match_label(prediction, expected):
    assert match_label(prediction, ("fresh", "rotten")) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("No answer.", "no answer"),    # both "no" and "no answer" are prefixes: the longer wins
    ("no answerable", "no"),        # "no answer" runs into a letter; "no" is followed by a space
    ("no, answer", "no"),
    ("NO", "no"),
])
def test_match_label_prefers_longest_label(prediction, expected):
    assert match_label(prediction, ("no", "no answer", "yes")) == expected


def test_match_label_prefers_same_case_label():
    assert match_label("yes", ("Yes", "yes")) == "yes"
    assert match_label("Yes", ("Yes", "yes")) == "Yes"
    assert match_label("YES", ("Yes", "yes")) == "Yes"  # case-insensitive ties: the first label


def test_label_accuracy():
    # fresh.→fresh ✓, Rotten→rotten ✓, freshly→None ✗, rotten!→rotten ≠ fresh ✗ → 2/4
    predictions = ["fresh.", "Rotten", "freshly", "rotten!"]
    assert label_accuracy(predictions, ["fresh", "rotten ", "fresh", "fresh"], ("fresh", "rotten")) == 0.5


# --- tool calls ------------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}
WEATHER_DICT = {"name": "get_weather", "arguments": {"unit": "C", "city": "Paris"}}   # no wrapper, other key order
WEATHER_LYON = {"name": "get_weather", "arguments": '{"city":"Lyon","unit":"C"}'}
TIME = {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}


def test_canonical_call():
    canonical = ("get_weather", '{"city":"Paris","unit":"C"}')
    assert canonical_call(WEATHER) == canonical
    assert canonical_call(WEATHER_DICT) == canonical
    assert canonical_call({"name": "f", "arguments": ' { "city" :\n"Zürich" } '}) == ("f", '{"city":"Zürich"}')
    assert canonical_call({"name": "f"}) == ("f", "{}")
    # not JSON: kept as the stripped raw string
    assert canonical_call({"name": "f", "arguments": " {city: Paris} "}) == ("f", "{city: Paris}")
    with pytest.raises(ValueError, match="name"):
        canonical_call({"function": {"arguments": "{}"}})


@pytest.mark.parametrize("predicted, reference, expected", [
    ([WEATHER], [WEATHER_DICT], 1.0),              # string vs dict, key order and whitespace differ
    ([WEATHER_LYON], [WEATHER], 0.0),              # different argument value
    ([WEATHER, TIME], [TIME, WEATHER_DICT], 1.0),  # order of calls is irrelevant
    ([WEATHER, WEATHER], [WEATHER], 0.0),          # duplicates count
    ([], [], 1.0),                                 # correct "no call"
    (None, [], 1.0),
    ([], [TIME], 0.0),
    ([{"name": "f", "arguments": "{city: Paris}"}], [{"name": "f", "arguments": " {city: Paris}"}], 1.0),
    ([{"name": "f", "arguments": "{city: Paris}"}], [{"name": "f", "arguments": '{"city": "Paris"}'}], 0.0),
])
def test_tool_call_exact_match_cases(predicted, reference, expected):
    assert tool_call_exact_match([predicted], [reference]) == expected


def test_tool_call_metrics_average_over_examples():
    predicted = [[WEATHER], [WEATHER, TIME], [], [WEATHER, WEATHER], [WEATHER_LYON]]
    reference = [[WEATHER_DICT], [TIME, WEATHER], [], [WEATHER], [WEATHER]]
    # exact: 1, 1, 1, 0 (duplicate), 0 (Lyon ≠ Paris) → 3/5
    assert tool_call_exact_match(predicted, reference) == pytest.approx(3 / 5)
    # names: 1, 1, 1, 0 ({get_weather: 2} ≠ {get_weather: 1}), 1 (arguments ignored) → 4/5
    assert function_name_accuracy(predicted, reference) == pytest.approx(4 / 5)


# --- registry and config checks --------------------------------------------------------------------------------

REGISTRY = {  # name: (formats, source, needs_labels, needs_tool_calls)
    "exact_match": (("prompt_completion", "chat"), "generation", False, False),
    "accuracy": (("prompt_completion",), "generation", True, False),
    "label_logprob_accuracy": (("prompt_completion",), "scores", True, False),
    **{name: (("prompt_completion",), "generation", False, False)
       for name in ("squad_exact_match", "squad_f1", "bleu", "chrf", "rouge_l")},
    "tool_call_exact_match": (("chat",), "generation", False, True),
    "function_name_accuracy": (("chat",), "generation", False, True),
    "loss": (("prompt_completion", "chat"), "scores", False, False),
    "perplexity": (("prompt_completion", "chat"), "scores", False, False),
}


def test_registry():
    assert {name: (set(m.formats), m.source, m.needs_labels, m.needs_tool_calls) for name, m in METRICS.items()} \
        == {name: (set(f), s, nl, nt) for name, (f, s, nl, nt) in REGISTRY.items()}
    assert all(m.name == name and m.description for name, m in METRICS.items())


@pytest.mark.parametrize("data_format, labels, has_tool_calls, expected", [
    ("prompt_completion", ("fresh", "rotten"), False,
     ("exact_match", "accuracy", "label_logprob_accuracy", "loss", "perplexity")),
    ("prompt_completion", None, False,
     ("exact_match", "squad_exact_match", "squad_f1", "bleu", "chrf", "rouge_l", "loss", "perplexity")),
    ("chat", None, False, ("exact_match", "loss", "perplexity")),
    ("chat", None, True, ("exact_match", "loss", "perplexity", "tool_call_exact_match", "function_name_accuracy")),
])
def test_default_metrics(data_format, labels, has_tool_calls, expected):
    assert default_metrics(data_format, labels=labels, has_tool_calls=has_tool_calls) == expected
    # the defaults always pass their own check
    assert check_metrics(expected, data_format, labels=labels, has_tool_calls=has_tool_calls, where="x") == expected


def test_check_metrics_deduplicates_in_order():
    assert check_metrics(["loss", "bleu", "loss", "exact_match", "bleu"], "prompt_completion", labels=None,
                         has_tool_calls=False, where="evaluation.metrics") == ("loss", "bleu", "exact_match")


@pytest.mark.parametrize("names, data_format, labels, has_tool_calls, message", [
    (["exact_mach"], "chat", None, False,
     r"^evaluation\.metrics: unknown metric 'exact_mach' \(did you mean 'exact_match'\?\); known metrics: .*rouge_l"),
    (["bleu"], "chat", None, True, r"^evaluation\.metrics: metric 'bleu' applies to prompt_completion data, not chat"),
    (["tool_call_exact_match"], "prompt_completion", ("a", "b"), False, r"applies to chat data"),
    (["loss", "accuracy"], "prompt_completion", None, False, r"'accuracy' needs the completions to be a small label"),
    (["label_logprob_accuracy"], "prompt_completion", None, False, "completions are not a small label set"),
    (["function_name_accuracy"], "chat", None, False, r"'function_name_accuracy' needs reference turns with tool"),
])
def test_check_metrics_errors(names, data_format, labels, has_tool_calls, message):
    with pytest.raises(ValueError, match=message):
        check_metrics(names, data_format, labels=labels, has_tool_calls=has_tool_calls, where="evaluation.metrics")


def test_unknown_data_format_is_an_error():
    with pytest.raises(ValueError, match="unknown data format 'completion'"):
        default_metrics("completion", labels=None, has_tool_calls=False)


# --- compute_generation_metrics --------------------------------------------------------------------------------


def test_compute_generation_metrics_text():
    names = ["loss", "exact_match", "squad_f1", "bleu", "chrf", "rouge_l", "squad_exact_match", "perplexity"]
    results = compute_generation_metrics(names, PREDICTIONS, REFERENCES)
    assert list(results) == ["exact_match", "squad_f1", "bleu", "chrf", "rouge_l", "squad_exact_match"]  # no scores
    for name, value in results.items():
        assert value == getattr(M, name)(PREDICTIONS, REFERENCES)
    assert results["exact_match"] == 0.0 and 0 < results["squad_f1"] < 1


def test_compute_generation_metrics_labels_and_tool_calls():
    assert compute_generation_metrics(["accuracy", "label_logprob_accuracy"], ["fresh.", "meh"], ["fresh", "rotten"],
                                      labels=("fresh", "rotten")) == {"accuracy": 0.5}
    results = compute_generation_metrics(["tool_call_exact_match", "function_name_accuracy"], ["", ""], ["", ""],
                                         predicted_calls=[[WEATHER_LYON], []], reference_calls=[[WEATHER], []])
    assert results == {"tool_call_exact_match": 0.5, "function_name_accuracy": 1.0}


@pytest.mark.parametrize("names, predictions, references, kwargs, message", [
    (["exact_match"], ["a"], ["a", "b"], {}, "1 predictions but 2 references"),
    (["exact_match"], [], [], {}, "no examples"),
    (["blue"], ["a"], ["a"], {}, "unknown metric 'blue'"),
    (["accuracy"], ["a"], ["a"], {}, "'accuracy' needs labels"),
    (["tool_call_exact_match"], ["a"], ["a"], {}, "needs predicted_calls and reference_calls"),
    (["function_name_accuracy"], ["a"], ["a"], {"predicted_calls": [[]], "reference_calls": [[], []]},
     "1 predictions but 1 predicted and 2 reference tool-call lists"),
])
def test_compute_generation_metrics_errors(names, predictions, references, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_generation_metrics(names, predictions, references, **kwargs)
