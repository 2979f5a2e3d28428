"""Chat templates, rendering with an answer-only loss mask, and chat shards (`prepare --format chat`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minicpm.data.chat import (ChatTemplate, end_of_turn_id, get_template, read_chat_jsonl, render_conversation,
                               render_prompt)
from minicpm.data.tokenizer import BOS_ID, EOS_ID, IM_END_ID, byte_level_tokenizer, save_tokenizer
from minicpm.errors import MiniCPMError

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"},
                {"role": "assistant", "content": "ok!"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(byte_level_tokenizer(), directory)
    return directory


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False)


def test_minicpm_template_is_the_released_one_with_bos_and_eos_closing_each_answer(tok):
    t = get_template("minicpm")
    ids, mask = render_conversation(CONVERSATION, t, tok)
    assert ids[0] == BOS_ID and not mask[0]
    # the released template strips every content and writes nothing after an answer; </s> closes the turn
    assert decode(tok, ids) == "<s>Be brief.<用户>hi<AI>yo</s><用户>more<AI>ok!</s>"
    assert decode(tok, [i for i, m in zip(ids, mask) if m]) == "yo</s>ok!</s>"
    assert t.end_of_turn == "</s>" and end_of_turn_id(t, tok) == EOS_ID


def test_chatml_masks_answers_and_im_end_but_not_the_newline_after_it(tok):
    t = get_template("chatml")
    ids, mask = render_conversation(CONVERSATION, t, tok)
    assert ids[0] != BOS_ID
    assert decode(tok, ids).endswith("<|im_start|>assistant\nok!<|im_end|>\n")
    assert decode(tok, [i for i, m in zip(ids, mask) if m]) == "yo<|im_end|>ok!<|im_end|>"
    assert end_of_turn_id(t, tok) == IM_END_ID
    assert [ids[i] for i in range(len(ids)) if mask[i] and ids[i] == IM_END_ID] == [IM_END_ID] * 2


def test_auto_reads_the_tokenizers_own_template_and_finds_its_end_of_turn(tok, tok_dir):
    auto = get_template("auto", tok_dir)  # our tokenizers ship ChatML
    assert auto.end_of_turn == "<|im_end|>"
    assert render_conversation(CONVERSATION, auto, tok) == render_conversation(CONVERSATION, get_template("chatml"), tok)
    # a shipped template that is one of ours goes by its name (the same rendering as auto gives it)
    assert get_template(None, tok_dir).name == "chatml" and get_template(None).name == "minicpm"


def test_auto_with_a_template_that_writes_no_end_uses_eos(tok, tmp_path):
    from minicpm.data.chat import MINICPM_TEMPLATE

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": MINICPM_TEMPLATE,
                                                                 "add_bos_token": True}))
    auto = get_template("auto", tmp_path)
    assert auto.end_of_turn == "</s>" and auto.add_bos
    assert render_conversation(CONVERSATION, auto, tok) == render_conversation(CONVERSATION, get_template("minicpm"), tok)


@pytest.mark.parametrize("name", ["minicpm", "chatml"])
def test_prompt_ids_are_the_conversations_ids_before_the_answer(tok, name):
    t = get_template(name)
    ids, mask = render_conversation(CONVERSATION, t, tok)
    prompt = render_prompt(CONVERSATION[:4], t, tok)
    assert ids[:len(prompt)] == prompt
    first_prompt = render_prompt(CONVERSATION[:2], t, tok)
    assert ids[:len(first_prompt)] == first_prompt and not any(mask[:len(first_prompt)])
    assert mask[len(first_prompt)] and mask[len(prompt)] and not mask[len(prompt) - 1]


def test_unknown_template_and_missing_auto_template_are_one_line_errors(tmp_path):
    with pytest.raises(MiniCPMError, match="unknown"):
        get_template("llama9")
    with pytest.raises(MiniCPMError, match="ships no chat_template"):
        get_template("auto", tmp_path)


def test_template_round_trips_through_its_description():
    t = get_template("chatml")
    assert ChatTemplate.from_description(json.loads(json.dumps(t.describe()))) == t


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"text": "x"}, "no 'messages'"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(MiniCPMError, match=rf"c.jsonl:3: .*{message}"):
        list(read_chat_jsonl(path))


def write_chat(path, n, long_answer=None, bad=None):
    lines = [json.dumps({"prompt": f"question {i}", "response": "answer " * (i % 3 + 1)}) for i in range(n)]
    if long_answer is not None:
        lines.insert(5, json.dumps({"prompt": "q", "response": "y" * long_answer}))
    if bad is not None:
        lines.insert(7, bad)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prepare_chat_writes_a_mask_channel_that_reads_back(tok_dir, tmp_path):
    from minicpm.data.prepare_chat import dataset_template, prepare_chat
    from minicpm.data.shards import TokenDataset, verify

    src = write_chat(tmp_path / "c.jsonl", 40, long_answer=500)
    result = prepare_chat([str(src)], tok_dir / "tokenizer.json", tmp_path / "out", seq_len=64, val_fraction=0.1)
    assert result.skipped_too_long == 1
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["loss_mask"] is True and meta["skipped_too_long"] == 1 and meta["chat"]["template"] == "minicpm"
    assert all("sha256_mask" in s for s in meta["splits"]["train"]["shards"])
    counts = verify(tmp_path / "out")
    assert counts["train"]["documents"] + counts["val"]["documents"] == 40
    ds = TokenDataset(tmp_path / "out")
    tok = byte_level_tokenizer()
    first = ds.document(0)
    mask = ds.loss_mask(int(ds.doc_starts[0]), int(ds.doc_starts[1]))
    expected, expected_mask = render_conversation([{"role": "user", "content": "question 1"},
                                                   {"role": "assistant", "content": "answer answer "}],
                                                  get_template("minicpm"), tok)
    assert first.tolist() == expected and mask.tolist() == expected_mask  # ends with </s>: no extra eos
    assert dataset_template(tmp_path / "out") == get_template("minicpm")


def test_prepare_chat_bad_line_writes_nothing(tok_dir, tmp_path):
    from minicpm.data.prepare_chat import prepare_chat

    src = write_chat(tmp_path / "c.jsonl", 20, bad=json.dumps({"messages": [{"role": "user", "content": "x"},
                                                                           {"role": "assistant", "content": ""}]}))
    with pytest.raises(MiniCPMError, match=r"c.jsonl:8: messages\[1\] is an empty assistant turn"):
        prepare_chat([str(src)], tok_dir / "tokenizer.json", tmp_path / "out", seq_len=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_prepare_chat_prompt_longer_than_seq_len_is_an_error(tok_dir, tmp_path):
    from minicpm.data.prepare_chat import prepare_chat

    src = write_chat(tmp_path / "c.jsonl", 20, bad=json.dumps({"prompt": "p" * 300, "response": "r"}))
    with pytest.raises(MiniCPMError, match=r"c.jsonl:8: the prompt is \d+ tokens, longer than --seq-len 64"):
        prepare_chat([str(src)], tok_dir / "tokenizer.json", tmp_path / "out", seq_len=64)
    assert not (tmp_path / "out").exists()


def test_plain_shards_read_as_all_targets(datasets):
    from minicpm.data.shards import TokenDataset

    ds = TokenDataset(datasets[1])
    assert not ds.has_loss_mask and ds.loss_mask(0, 10).tolist() == [True] * 10
    assert np.array_equal(ds.tokens(0, 10), ds.tokens(0, 10))
