"""The bAbI-style story generator: consistent worlds, deterministic output, a closed vocabulary, the CLI."""

from __future__ import annotations

import json
import random

import pytest
from implicit_lm.eval import stories as st

from implicit_lm.tasks import stories as tasks


def replay(story: tasks.Story) -> dict[str, str | None]:
    """Answers recomputed independently from the story text: track people and objects sentence by sentence."""
    person_room, holder, object_room, answers = {}, {}, {}, {}
    for sentence in (s.strip() for s in story.text().split(" .") if s.strip()):
        words = sentence.split()
        if words[0] == "the":  # opening: "the apple is in the kitchen"
            object_room[words[1]] = words[-1]
            continue
        if words[0] == "where":  # "where is [the] X ? ANSWER"
            entity = words[-3]
            if entity in tasks.PEOPLE:
                known = person_room.get(entity)
            else:
                known = person_room[holder[entity]] if entity in holder else object_room.get(entity)
            assert words[-1] == known, (sentence, known)
            answers[sentence] = known
            continue
        if len(words) >= 4 and words[1] == "went":
            person_room[words[0]] = words[-1]
        elif words[1] == "picked":
            assert object_room.get(words[-1]) in (None, person_room[words[0]]), "picked up from another room"
            holder[words[-1]] = words[0]
        elif words[1] == "dropped":
            assert holder.pop(words[-1]) == words[0], "dropped something not held"
            object_room[words[-1]] = person_room[words[0]]
    return answers


def test_answers_follow_the_story():
    for story in tasks.generate_stories(300, 1, 30, seed=1, questions=3):
        replay(story)  # asserts every inline answer
        assert story.questions[-1].events_before == len(story.events)
        assert all(q.answer in tasks.ROOMS for q in story.questions)


def test_prompt_ends_at_the_question():
    story = tasks.generate_story(random.Random(0), 12, questions=3)
    for question in story.questions:
        prompt = story.prompt(question)
        assert prompt.endswith(question.text)
        assert story.text().startswith(prompt)
        assert story.text()[len(prompt):].split()[0] == question.answer


def test_deterministic_and_seed_dependent():
    first = [s.text() for s in tasks.generate_stories(20, 3, 10, seed=5)]
    assert first == [s.text() for s in tasks.generate_stories(20, 3, 10, seed=5)]
    assert first != [s.text() for s in tasks.generate_stories(20, 3, 10, seed=6)]


def test_tokenizer_covers_every_story():
    tokenizer = tasks.story_tokenizer()
    for story in tasks.generate_stories(50, 1, 20, seed=2):
        ids = tokenizer(story.text())["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == " " + story.text()  # every word decodes with its leading space


def test_cli(tmp_path, capsys):
    output = tmp_path / "stories.jsonl"
    st.main(["--num-stories", "7", "--min-events", "2", "--max-events", "5", "--output", str(output)])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 7 and all(2 <= r["events"] <= 5 and "where is" in r["text"] for r in records)
    with pytest.raises(SystemExit) as exit_info:
        st.main(["--min-events", "5", "--max-events", "2", "--output", str(tmp_path / "bad.jsonl")])
    assert exit_info.value.code == 2 and "min_events <= max_events" in capsys.readouterr().err
    assert not (tmp_path / "bad.jsonl").exists()


def test_model_evaluation_by_story_length(tmp_path, saved_models, capsys):
    from conftest import tiny_mamba2

    tokenizer = tasks.story_tokenizer()
    model = tiny_mamba2(vocab_size=len(tokenizer), eval_max_iterations=50, tolerance=1e-4)
    model.save_pretrained(tmp_path / "story-lm")
    tokenizer.save_pretrained(tmp_path / "story-lm")
    payload = st.main(["--model", str(tmp_path / "story-lm"), "--lengths", "2,6", "--stories-per-length", "3",
                       "--output-dir", str(tmp_path / "out")])
    results = payload["results"]
    assert [r["events"] for r in results] == [2, 6]
    assert results[1]["prompt_tokens_mean"] > results[0]["prompt_tokens_mean"]
    assert all(0 <= r["accuracy"] <= 1 and r["answer_iterations_mean"] >= 1 for r in results)
    assert (tmp_path / "out" / "stories.json").is_file() and (tmp_path / "out" / "stories.png").is_file()
    # A model whose tokenizer does not know the story words is refused.
    with pytest.raises(SystemExit):
        st.main(["--model", str(saved_models["mamba2"]), "--output-dir", str(tmp_path / "bad")])
    assert "not a story LM" in capsys.readouterr().err
