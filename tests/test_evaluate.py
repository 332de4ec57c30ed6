"""evaluate(): scores against transformers+peft on the same weights, answers from the engine, base beside adapter,
every input error before a model is loaded, the command line, and evaluation inside a job."""

import json

import pytest
import torch

from nemo_customizer.config import ConfigError
from nemo_customizer.data import DatasetError

from _tiny import TINY_VOCAB, tiny_arch, write_classification_data, write_random_peft_adapter, write_tiny_model_dir

MODEL = {"checkpoint": None, "random_weights": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, HF base model, HF peft model) with data/, test.jsonl and a random LoRA adapter in adapter/."""
    root = tmp_path_factory.mktemp("evaluate")
    hf = write_tiny_model_dir(root / "model")
    write_classification_data(root / "data", n_train=48, n_val=8)
    write_classification_data(root / "heldout", n_train=12, n_val=1, seed=5)
    (root / "test.jsonl").write_text((root / "heldout" / "training.jsonl").read_text())
    peft_model = write_random_peft_adapter(root / "model", root / "adapter", ["q_proj", "v_proj"])
    return root, hf.eval(), peft_model.eval()


def _evaluate(root, **kwargs):
    from nemo_customizer import evaluate

    return evaluate(kwargs.pop("dataset", str(root / "test.jsonl")), config="tiny-llama-test", device="cpu",
                    model={**MODEL, "checkpoint": str(root / "model")}, progress=False, **kwargs)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reference_scores(hf_model, tokenizer, rows):
    """Token-mean loss on completion+EOS and label log-prob accuracy, computed directly with an HF model."""
    labels = sorted({r["completion"] for r in rows})
    nll = count = correct = 0.0
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        totals = {}
        for label in labels:
            target = tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = hf_model(torch.tensor([prompt + target])).logits[0].float()
            logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1).gather(1, torch.tensor(target)[:, None])
            totals[label] = float(logprobs.sum())
            if label == row["completion"]:
                nll -= totals[label]
                count += len(target)
        correct += max(totals, key=totals.get) == row["completion"]
    return nll / count, correct / len(rows)


def test_base_and_adapter_scores_equal_transformers_and_peft(tiny, tmp_path):
    from transformers import AutoTokenizer

    root, hf, peft_model = tiny
    report = _evaluate(root, adapter=str(root / "adapter"), compare_base=True, output=str(tmp_path / "out.json"))
    rows = _rows(root / "test.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(str(root / "model"))
    assert report.format == "prompt_completion" and report.rows == len(rows)
    assert report.metrics == ("exact_match", "accuracy", "label_logprob_accuracy", "loss", "perplexity")
    for result, reference in ((report.base, hf), (report.customized, peft_model)):
        loss, logprob_accuracy = _reference_scores(reference, tokenizer, rows)
        assert result.metrics["loss"] == pytest.approx(loss, rel=1e-4)
        assert result.metrics["perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)
        assert result.metrics["label_logprob_accuracy"] == pytest.approx(logprob_accuracy)
    assert report.base.metrics["loss"] != pytest.approx(report.customized.metrics["loss"], rel=1e-3)
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["metrics"] == report.summary() and len(written["predictions"]) == len(rows)
    assert written["predictions"][0]["customized"] == report.customized.predictions[0]
    assert [row["reference"] for row in written["predictions"]] == [r["completion"] for r in rows]
    table = report.table()
    assert "label_logprob_accuracy" in table and "base" in table and "customized" in table and "change" in table


def test_answers_are_the_engines_greedy_completions_and_metrics_follow(tiny):
    from nemo_customizer.evaluation.metrics import exact_match
    from nemo_customizer.inference import Generator

    from _tiny import tiny_generator_config

    root, _, _ = tiny
    rows = _rows(root / "test.jsonl")
    report = _evaluate(root, adapter=str(root / "adapter"), max_tokens=6, metrics=["exact_match", "chrf"])
    assert report.base is None and report.customized.details["max_tokens"] == 6
    arch = tiny_arch(vocab=TINY_VOCAB)
    import dataclasses

    arch = dataclasses.replace(arch, max_position_embeddings=2048, head_dim=16, bos_token_id=1, eos_token_id=2)
    with Generator.from_config(tiny_generator_config(root / "model", arch), adapter=str(root / "adapter")) as gen:
        want = [c.text.strip() for c in gen.complete_batch([r["prompt"] for r in rows], max_tokens=6)]
    assert report.customized.predictions == want
    assert report.customized.metrics["exact_match"] == exact_match(want, [r["completion"] for r in rows])
    assert list(report.customized.metrics) == ["exact_match", "chrf", "loss", "perplexity"]


def test_without_an_adapter_the_base_model_is_evaluated(tiny):
    root, _, _ = tiny
    report = _evaluate(root, metrics=["squad_f1"])
    assert report.customized is None and set(report.base.metrics) == {"squad_f1", "loss", "perplexity"}


@pytest.mark.parametrize("kwargs, error, message", [
    ({"metrics": ["exact_mach"]}, ConfigError, r"unknown metric 'exact_mach' \(did you mean 'exact_match'\?\)"),
    ({"metrics": ["tool_call_exact_match"]}, ConfigError, "applies to chat data, not prompt_completion"),
    ({"max_tokens": 0}, ConfigError, r"evaluation.max_tokens=0: must be at least 1"),
    ({"dataset": "missing.jsonl"}, DatasetError, "evaluation file does not exist"),
])
def test_bad_input_fails_before_a_model_is_loaded(tiny, monkeypatch, kwargs, error, message):
    from nemo_customizer.inference import Generator

    root, _, _ = tiny
    monkeypatch.setattr(Generator, "from_config", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    with pytest.raises(error, match=message):
        _evaluate(root, **kwargs)


def test_free_text_metrics_refuse_label_only_data_and_malformed_rows(tiny, tmp_path, monkeypatch):
    from nemo_customizer.inference import Generator

    root, _, _ = tiny
    monkeypatch.setattr(Generator, "from_config", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    free_text = tmp_path / "free.jsonl"
    free_text.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"answer number {i}"})
                                   for i in range(6)) + "\n")
    with pytest.raises(ConfigError, match="completions are not a small label set"):
        _evaluate(root, dataset=str(free_text), metrics=["accuracy"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl:2: field \"completion\" is missing"):
        _evaluate(root, dataset=str(broken))


def test_an_adapter_of_another_base_model_is_refused_before_loading(tiny, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_customizer.inference import Generator

    root, _, _ = tiny
    other = LlamaForCausalLM(LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(tmp_path / "a"))
    monkeypatch.setattr(Generator, "from_config", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    with pytest.raises(ConfigError, match=r"does not fit this base model: .*q_proj.lora_A.weight has shape \(4, 32\)"):
        _evaluate(root, adapter=str(tmp_path / "a"))


def test_command_line_evaluate_writes_json_and_exits_2_on_bad_input(tiny, tmp_path, capsys):
    from nemo_customizer.cli import main

    root, _, _ = tiny
    model = ["model=tiny-llama-test", f"model.checkpoint={root / 'model'}", "model.random_weights=false",
             "device=cpu", "progress_bar=false"]
    out = tmp_path / "cli.json"
    assert main(["evaluate", "--data", str(root / "test.jsonl"), "--adapter", str(root / "adapter"),
                 "--compare-base", "--metrics", "exact_match,accuracy", "--output", str(out), *model]) == 0
    written = json.loads(out.read_text())
    assert set(written["metrics"]) == {"base", "customized"}
    assert list(written["metrics"]["base"]) == ["exact_match", "accuracy", "loss", "perplexity"]
    assert "customized" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(root / "test.jsonl"), "--metrics", "bleux", *model]) == 2
    assert "unknown metric 'bleux'" in capsys.readouterr().err
    assert main(["evaluate", *model]) == 2


def test_evaluation_inside_a_job_before_and_after_training(tiny, tmp_path):
    import shutil

    from nemo_customizer import customize
    from nemo_customizer.cli import main

    root, _, _ = tiny
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    shutil.copy(root / "test.jsonl", data / "test.jsonl")  # found beside the training files
    result = customize("tiny-llama-test", dataset=str(data), output_dir=str(tmp_path / "job"), device="cpu",
                       progress_bar=False, model={**MODEL, "checkpoint": str(root / "model")},
                       hyperparameters={"epochs": 1, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 5e-3,
                                        "lora": {"adapter_dropout": 0.0}},
                       evaluation={"enabled": True, "metrics": ["accuracy", "label_logprob_accuracy"]})
    assert set(result.evaluation) == {"base", "customized"}
    assert list(result.evaluation["customized"]) == ["accuracy", "label_logprob_accuracy", "loss", "perplexity"]
    job = tmp_path / "job"
    status = json.loads((job / "status.json").read_text())
    assert status["status"] == "completed" and status["evaluation"] == result.evaluation
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in records if r["event"] == "evaluation"]
    assert event["customized"] == result.evaluation["customized"]
    assert json.loads((job / "result.json").read_text())["evaluation"] == result.evaluation
    assert (job / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the bar chart (matplotlib)
    saved = json.loads((job / "evaluation.json").read_text())
    assert saved["metrics"] == result.evaluation and saved["adapter"] == str(job / "adapter")
    # the same evaluation from the job directory, by the command line, gives the same numbers
    assert main(["evaluate", "--job", str(job), "--data", str(data / "test.jsonl"), "--compare-base",
                 "--metrics", "accuracy,label_logprob_accuracy", "device=cpu", "progress_bar=false"]) == 0
    again = json.loads((job / "evaluation.json").read_text())["metrics"]
    for model in ("base", "customized"):
        for name, value in result.evaluation[model].items():
            assert again[model][name] == pytest.approx(value, rel=1e-6)


def test_a_bad_evaluation_file_stops_the_job_before_its_directory_exists(tiny, tmp_path):
    from nemo_customizer import customize

    root, _, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:1"):
        customize("tiny-llama-test", dataset=str(root / "data"), output_dir=str(tmp_path / "job"), device="cpu",
                  model={**MODEL, "checkpoint": str(root / "model")}, evaluation={"dataset": str(bad)})
    with pytest.raises(ConfigError, match="no held-out data to evaluate on"):
        customize("tiny-llama-test", dataset=str(root / "data"), output_dir=str(tmp_path / "job"), device="cpu",
                  model={**MODEL, "checkpoint": str(root / "model")}, evaluation={"enabled": True})
    assert not (tmp_path / "job").exists()
