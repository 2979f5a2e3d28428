"""lm-evaluation-harness adapter: its log-likelihoods are our forward's, generation stops where it should, and the
built-in stdlib task runs end to end through lm_eval.simple_evaluate."""

import json

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from minicpm.data.tokenizer import EOS_ID, train_tokenizer  # noqa: E402
from minicpm.errors import MiniCPMError  # noqa: E402
from minicpm.eval import task_runner  # noqa: E402
from minicpm.eval.harness import MiniCPMLM  # noqa: E402
from minicpm.eval.stdlib_task import build_stdlib_task, stdlib_questions  # noqa: E402
from minicpm.interop.hf import save_model  # noqa: E402
from minicpm.model.config import ModelConfig  # noqa: E402
from minicpm.model.build import build_model  # noqa: E402


CORPUS = ("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n\n\n"
          "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
          "The quick brown fox jumps over the lazy dog. Numbers 0123456789 and more text here.\n") * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random MiniCPM (d=64) with a 400-token BPE trained on a small corpus, saved as a checkpoint."""
    root = tmp_path_factory.mktemp("harness")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    tokenizer = train_tokenizer([str(corpus)], 400, root / "tok")
    config = ModelConfig(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, dim_model_base=16, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = build_model(config, seed=0)
    with torch.no_grad():  # gains away from 1; an untied head, so that greedy text is not the last token repeated
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return save_model(model, root / "ckpt", extra_files={"tokenizer.json": tokenizer})


@pytest.fixture(scope="module")
def lm(checkpoint):
    return MiniCPMLM(checkpoint, batch_size=3, dtype="fp32")


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def forward_logprobs(model, ids):
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)


def reference_loglikelihood(lm, context_ids, continuation_ids):
    """Sum over the continuation of our forward's log-softmax, and whether each token is the argmax."""
    ids = (context_ids + continuation_ids)[-(lm.max_length + 1):]
    logprobs = forward_logprobs(lm.model, ids[:-1])[-len(continuation_ids):]
    target = torch.tensor(continuation_ids)
    return logprobs.gather(1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihood_equals_our_forward_over_the_continuation(lm):
    pairs = [("def add(a, b):", " return a + b"), ("The quick brown", " fox"), ("The quick brown", " dog"),
             ("class Point:\n    def", " __init__(self, x, y):"), ("", "The lazy dog."), ("Numbers 01", "23"),
             # longer than max_length (64): cut from the left
             (("The quick brown fox jumps over the lazy dog. " * 8).rstrip(), " Numbers")]
    results = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        if context:
            whole, ctx = lm.tok_encode(context + continuation), lm.tok_encode(context)
            context_ids, continuation_ids = ctx, whole[len(ctx):]
        else:
            context_ids, continuation_ids = [EOS_ID], lm.tok_encode(continuation)
        expected, expected_greedy = reference_loglikelihood(lm, context_ids, continuation_ids)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_loglikelihood_rolling_is_the_full_sequence_nll_conditioned_on_end_of_document(lm, checkpoint):
    text = "def add(a, b):\n    return a + b\n"
    ids = lm.tok_encode(text)
    nll = F.cross_entropy(lm.model(torch.tensor([[EOS_ID] + ids[:-1]]))[0], torch.tensor(ids), reduction="sum")
    [rolling] = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert rolling == pytest.approx(-nll.item(), abs=1e-4)

    # past max_length: lm-eval's disjoint windows, each token predicted once with as much context as fits
    short = MiniCPMLM(checkpoint, max_length=16, batch_size=2)
    long_text = CORPUS[:300]
    ids = short.tok_encode(long_text)
    expected, predicted = 0.0, 0
    while predicted < len(ids):
        end = min(predicted + 16, len(ids))
        window = ([EOS_ID] + ids)[max(0, end - 16):end]
        logprobs = forward_logprobs(short.model, window)[-(end - predicted):]
        expected += logprobs.gather(1, torch.tensor(ids[predicted:end])[:, None]).sum().item()
        predicted = end
    [rolling] = short.loglikelihood_rolling([request("loglikelihood_rolling", long_text)])
    assert len(ids) > 40 and rolling == pytest.approx(expected, abs=1e-3)


def greedy_reference(model, ids, steps):
    """Greedy decoding without a cache: the whole sequence again at every step."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        out.append(token)
        if token == EOS_ID:
            break
    return out


def test_generate_until_matches_greedy_decoding_and_stops_at_the_stop_string(lm):
    prompts = ["def add(a, b):", "The quick brown fox jumps", "class"]  # different lengths in one batch
    references = [greedy_reference(lm.model, lm.tok_encode(p), 12) for p in prompts]
    texts = [lm.tok_decode(r) for r in references]
    unbounded = lm.generate_until([request("generate_until", p, {"until": [], "max_gen_toks": 12}) for p in prompts])
    assert unbounded == [t.split("</s>")[0] for t in texts]

    # a stop string that first appears part-way through the first prompt's continuation
    text = texts[0]
    stop = next(text[i:i + 2] for i in range(2, len(text) - 1)
                if text[i:i + 2].isascii() and text[i:i + 2].strip() and text[i:i + 2] not in text[:i + 1])
    [out] = lm.generate_until([request("generate_until", prompts[0], {"until": [stop], "max_gen_toks": 12})])
    assert out == text.split(stop)[0]
    tokens = lm._generate([lm.tok_encode(prompts[0])], 12, [stop], 0.0)[0]
    assert stop in lm.tok_decode(tokens) and stop not in lm.tok_decode(tokens[:-1])  # it stopped right there


@pytest.mark.slow
def test_stdlib_task_runs_offline_through_simple_evaluate(checkpoint, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # what HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 set when datasets is imported (here it may already be)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    task_dir = build_stdlib_task(tmp_path / "tasks", n=16)
    import minicpm.eval.harness  # noqa: F401  registers "minicpm"

    results = lm_eval.simple_evaluate(
        model="minicpm", model_args=f"pretrained={checkpoint},batch_size=8,device=cpu,dtype=fp32",
        tasks=["stdlib_names"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        limit=8, bootstrap_iters=0)
    scores = results["results"]["stdlib_names"]
    assert results["n-samples"]["stdlib_names"]["effective"] == 8
    # acc is the share of questions whose highest log-likelihood choice is the answer: recompute it
    lm = MiniCPMLM(checkpoint)
    correct = 0
    for question in stdlib_questions(16)[:8]:
        context = question["code"] + "\n# The name of the function above is"
        scores_ = lm.loglikelihood([request("loglikelihood", context, " " + c) for c in question["choices"]])
        correct += max(range(4), key=lambda i: scores_[i][0]) == question["label"]
    assert scores["acc,none"] == correct / 8 and 0.0 <= scores["acc_norm,none"] <= 1.0


def test_evaluate_tasks_builds_the_builtin_task_and_writes_results(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(task_runner, "BUILTIN_QUESTIONS", 12)
    out = tmp_path / "results.json"
    results = task_runner.evaluate_tasks(checkpoint, "stdlib_names", limit=4, batch_size=4, output=out,
                                         include_defaults=False)
    assert json.loads(out.read_text()) == results
    assert results["n-samples"]["stdlib_names"]["effective"] == 4
    assert 0.0 <= results["results"]["stdlib_names"]["acc,none"] <= 1.0
    table = task_runner.format_results(results)
    assert "stdlib_names" in table and "acc_norm" in table


def test_unknown_task_is_one_line_error_with_close_names(checkpoint, tmp_path):
    task_dir = build_stdlib_task(tmp_path / "tasks", n=8)
    with pytest.raises(MiniCPMError, match=r"unknown task 'stdlib_name'; close names: stdlib_names") as error:
        task_runner.evaluate_tasks(checkpoint, ["stdlib_name"], include_path=task_dir, include_defaults=False)
    assert "\n" not in str(error.value)


def test_stdlib_questions_are_deterministic_and_fair():
    questions = stdlib_questions(8)
    assert questions == stdlib_questions(8) and questions != stdlib_questions(8, seed=1)
    for q in questions:
        answer = q["choices"][q["label"]]
        assert len(set(q["choices"])) == 4 and answer not in q["code"] and q["code"].startswith(("def ___", "async def ___"))


def test_an_in_memory_model_scores_like_its_checkpoint(lm, checkpoint):
    in_memory = MiniCPMLM(lm.model, tokenizer=checkpoint, batch_size=2)
    pairs = [request("loglikelihood", "def add(a, b):", " return a + b"), request("loglikelihood", "class", " Point")]
    assert in_memory.loglikelihood(pairs) == lm.loglikelihood(pairs)
    with pytest.raises(MiniCPMError, match="an in-memory model needs tokenizer"):
        MiniCPMLM(lm.model)


def test_bad_model_args_are_one_line_errors(checkpoint):
    with pytest.raises(MiniCPMError, match="unknown option 'batchsize'"):
        MiniCPMLM(checkpoint, batchsize=4)
    with pytest.raises(MiniCPMError, match="batch_size must be a positive integer, got 'auto'"):
        MiniCPMLM(checkpoint, batch_size="auto")


@pytest.mark.slow
def test_lm_eval_tasks_run_as_an_evaluator_during_training(tmp_path):
    from train_helpers import PatternData, make_datasets, tiny_config

    from minicpm.rundir import RunDir
    from minicpm.train.loop import train

    tokenizer, code, _ = make_datasets(tmp_path / "data")
    cfg = tiny_config(tmp_path / "run", f"data.tokenizer={tokenizer}", "schedule.total_steps=4",
                      "schedule.decay_start=3", "run.eval_every=0",
                      "evaluators=[{kind: lm_eval, name: tasks, tasks: [stdlib_names], limit: 4}]")
    train(cfg, data=PatternData(cfg.schedule.resolve(), vocab_size=256))  # ids below the tokenizer's vocabulary
    [last] = [r for r in RunDir(tmp_path / "run").read_metrics() if "eval/tasks/stdlib_names/acc" in r]
    assert last["step"] == 4 and last["eval/tasks/stdlib_names/acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
